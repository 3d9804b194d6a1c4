"""Time `store.write_run` for one paper-scale run: can a single writer keep up?

    python benchmarks/write.py [--d 3072] [--steps 31] [--runs 6] [--keep all|last_k] [--driver-metrics]

Builds the result a 160M run returns (12 layers × 2 sites × 4 strata × `--steps` measured
steps, D eigenvalues each) with random spectra and stores it into a fresh store, twice, printing
the time of each write and the store's size (commits must not grow with the store). The workers attach the metrics
(`contract.metrics.attach_metrics`), so that is timed apart, as the worker's share; with
`--driver-metrics` the result arrives without them (a spooled result from an older version)
and `write_run` computes them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from contract import metrics
from contract.records import Evaluation, RunResult, Spectrum
from spectraldb import store
from spectraldb.spec import RunSpec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=3072)
    ap.add_argument("--steps", type=int, default=31)
    ap.add_argument("--keep", default="all")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--driver-metrics", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    db = Path(tempfile.mkdtemp()) / "w.duckdb"
    times = []
    for i in range(a.runs):
        run = RunSpec.model_validate({"model": {"d_model": 768, "n_layer": 12, "n_head": 12,
                                                "ffn_mult": a.d / 768}, "train": {"steps": 6000, "seed": i},
                                      "measure": {"every": 200, "last_k": 5, "keep_eigenvalues": a.keep}})
        steps = [1] + [200 * k for k in range(1, a.steps)]
        spectra = [Spectrum(s, layer, site, st, 500_000, a.d, np.sort(rng.exponential(size=a.d))[::-1], 0.0)
                   for s in steps for layer in range(12) for site in ("pre", "post")
                   for st in ("all", "head", "mid", "tail")]
        result = RunResult("done", [Evaluation(s, 3.0, 3.1, 22.2) for s in steps], spectra, 0.0, 1.0)
        t = time.perf_counter()
        if not a.driver_metrics:
            metrics.attach_metrics(spectra)
            print(f"worker: metrics of {len(spectra)} spectra in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        store.write_run(db, run, result, {})
        dt = time.perf_counter() - t
        times.append(dt)
        n = sum(len(s.eigenvalues) for s in spectra)
        print(f"write {i + 1}: {dt:.2f} s for {len(spectra)} spectra, {n / 1e6:.1f} M eigenvalues "
              f"(keep={a.keep}); store now {db.stat().st_size / 2**20:.0f} MiB")
    print(f"write_run: min {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s, max {max(times):.2f} s")


if __name__ == "__main__":
    main()
