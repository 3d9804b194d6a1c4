"""The test tiers' wall times, side by side: the unit tier, and the fast loop on every core with
each xdist worker's BLAS/OpenMP threads at their share (tests/conftest.py) against as many as the
machine has cores (what torch takes unasked), alternating so a slow minute hits both alike.

    python benchmarks/tiers.py            # 3 rounds: ~4 minutes on 2 cores
    python benchmarks/tiers.py --rounds 1

Run it in a checkout nobody edits meanwhile (the tiers read the tree as it is).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def timed(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"tiers: pytest {' '.join(args)} failed:\n{out.stdout[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    crowded = {**base, **{k: str(cores) for k in THREAD_VARS}}
    fast = ["-m", "not slow", "-n", str(cores)]
    times: dict[str, list[float]] = {"unit": [], "fast, threads shared": [], f"fast, {cores} threads each": []}
    for _ in range(a.rounds):
        times["unit"].append(timed(["-m", "unit"], base))
        times["fast, threads shared"].append(timed(fast, base))
        times[f"fast, {cores} threads each"].append(timed(fast, crowded))
    print(f"{cores} cores, {a.rounds} round(s); wall seconds with the interpreter's start")
    for name, walls in times.items():
        print(f"  {name:24s} {min(walls):6.1f}–{max(walls):6.1f}  median {statistics.median(walls):6.1f}")
    shared, each = (statistics.median(w) for w in list(times.values())[1:])
    print(f"  fast loop, threads each / shared: {each / shared:.2f}×")


if __name__ == "__main__":
    main()
