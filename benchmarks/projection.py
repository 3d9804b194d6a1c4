"""Projected measurement share of training for the 160M programme (a projection, not a measurement).

    python benchmarks/projection.py [--tokens 524288] [--gemm-tflops 40] [--eig-tflops 1] [--host-cores 16]

Model (every input is a flag; docs/scaling.md explains each):
- a run: 6000 steps × 1024 × 512 tokens; training = 6·N_params·T at 400 TFLOP/s, N_params =
  66.9 M + 14.2 M·k for D = 768·k;
- 31 measured steps, each: 12 layers × 2 sites × 4 strata = 96 spectra over `--tokens` tokens
  (every token lands in one of head/mid/tail; `all` is their merge);
- previous design: products in fp32 on the GPU (negligible here), every covariance copied to
  the host and decomposed there in fp64 one at a time, synchronously, with the eigvalsh time
  measured on one core of the 2-core EPYC VM (`python -m workers.bench --scaling`);
- new design (fp64 policy): products as fp64 GEMMs on the GPU at `--gemm-tflops` (2·N·D² per
  layer × site), the 96 eigvalsh batched on the GPU at `--eig-tflops` effective on 4/3·D³ each,
  overlapped with training on a side stream; the loop waits for the products only;
- alternative: the decompositions on `--host-cores` idle host cores (fp64, the measured
  one-core time), which keep up when they finish within the training between measured steps.
"""

from __future__ import annotations

import argparse

# eigvalsh fp64 of one D×D covariance, one core of the 2-core AMD EPYC VM (workers.bench --scaling)
HOST_EIG_S = {768: 0.045, 1536: 0.268, 3072: 1.814, 6144: 14.52}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=524_288)
    ap.add_argument("--gemm-tflops", type=float, default=40.0)
    ap.add_argument("--eig-tflops", type=float, default=1.0)
    ap.add_argument("--train-tflops", type=float, default=400.0)
    ap.add_argument("--host-cores", type=int, default=16)
    ap.add_argument("--measured-steps", type=int, default=31)
    a = ap.parse_args()
    steps, tokens = 6000, 6000 * 1024 * 512
    print(f"PROJECTION: {a.tokens:,} measured tokens, {a.measured_steps} measured steps, GEMM fp64 "
          f"{a.gemm_tflops:g} TFLOP/s, GPU eigvalsh {a.eig_tflops:g} TFLOP/s effective, training "
          f"{a.train_tflops:g} TFLOP/s, {a.host_cores} host cores")
    print("| D | training | previous design (host eigvalsh) | new: loop waits (products) | new: GPU work "
          "(products + eigvalsh) | host-core decomposition keeps up? |")
    print("|---|---|---|---|---|---|")
    for D, host in HOST_EIG_S.items():
        k = D // 768
        train_s = 6 * (66.9e6 + 14.2e6 * k) * tokens / (a.train_tflops * 1e12)
        old = a.measured_steps * 96 * host
        products = a.measured_steps * 24 * 2 * a.tokens * D * D / (a.gemm_tflops * 1e12)
        eig = a.measured_steps * 96 * (4 / 3) * D ** 3 / (a.eig_tflops * 1e12)
        gap = train_s / steps * 200  # training between two measured steps
        host_step = 96 * host / a.host_cores
        print(f"| {D} | {train_s / 3600:.2f} h | {old / 3600:.2f} h = {100 * old / train_s:.0f}% | "
              f"{products / 60:.1f} min = {100 * products / train_s:.1f}% | {(products + eig) / 60:.1f} min = "
              f"{100 * (products + eig) / train_s:.1f}% | {host_step:.0f} s per measured step vs {gap:.0f} s "
              f"between them: {'yes' if host_step < gap else 'no'} |")


if __name__ == "__main__":
    main()
