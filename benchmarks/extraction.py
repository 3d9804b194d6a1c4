"""Streaming covariance vs a naive reference (hold all activations, then numpy.cov).

Prints wall time and peak traced memory of each, and their ratios, measured in one run.
Also times Newton–Schulz orthogonalisation in bf16 vs fp32 on this machine (why Muon's
`ns_dtype: auto` picks fp32 on a CPU).

    python benchmarks/extraction.py [--n 32768] [--d 512] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from workers.extract import StreamingCovariance
from workers.optim import orthogonalize


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((a.chunk, a.d), dtype=np.float32) for _ in range(a.n // a.chunk)]

    def streaming():
        cov = StreamingCovariance(a.d)
        for c in chunks:
            cov.update(torch.from_numpy(c))
        return cov.covariance()

    def naive():
        x = np.concatenate([c.astype(np.float64) for c in chunks])  # the N×D matrix a naive tool keeps
        return np.cov(x, rowvar=False)

    with threadpool_limits(a.threads, user_api="blas"):  # numpy's and scipy's BLAS too
        s, ts, _ = timed(streaming)
        r, tn, _ = timed(naive)
    # torch allocations are invisible to tracemalloc, so count the bytes each method must hold:
    ms = (a.d * a.d + a.d) * 8 + a.chunk * a.d * 8  # float64 scatter + mean + one chunk in float64
    mn = a.n * a.d * 8 + a.d * a.d * 8              # all activations in float64 + the covariance
    err = np.abs(s - r).max() / np.abs(r).max()
    print(f"covariance N={a.n} D={a.d} chunk={a.chunk} threads={a.threads}")
    print(f"  streaming: {ts:.3f} s, holds {ms / 2**20:.1f} MiB")
    print(f"  naive:     {tn:.3f} s, holds {mn / 2**20:.1f} MiB")
    print(f"  time ratio streaming/naive = {ts / tn:.2f}; memory ratio = {ms / mn:.3f}; max rel diff {err:.1e}")
    for shape in ((512, 64), (64, 512), (256, 256)):  # bf16 at 768×3072 takes ~25 s per call here
        g = torch.randn(*shape)
        for dt in (torch.float32, torch.bfloat16):
            orthogonalize(g, dtype=dt)
            t = time.perf_counter()
            for _ in range(5):
                orthogonalize(g, dtype=dt)
            per = (time.perf_counter() - t) / 5
            print(f"  newton-schulz {shape} {str(dt).removeprefix('torch.')}: {per * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
