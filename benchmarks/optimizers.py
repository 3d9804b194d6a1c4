"""Optimizer step time as a ratio to AdamW's, and Newton–Schulz's share of a training step.

    python benchmarks/optimizers.py [--device cpu|cuda] [--repeats 3] [--threads 2]

Part 1 steps each optimizer on one block of the 160M model's matrices (q, k, v, o 768×768;
c_fc 3072×768; c_proj 768×3072), gradients random, and prints ms per step and the ratio to
AdamW on the same tensors. Part 2 trains the default CPU model (d_model 64, ffn_mult 4, vocab
2048, batch 32 × 64) with Muon and reports the fraction of a full step (forward, backward,
optimizer) spent inside Newton–Schulz.
"""

from __future__ import annotations

import argparse
import time

import torch

import workers.muon as muon_mod
from contract.config import MuonConfig
from workers.model import GPT, GPTConfig
from workers.optim import Dion, Muon, NorMuon, build_optimizers

SHAPES_160M = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(opt, params, device, repeats):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state init outside the timing
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    sync(device)
    return (time.perf_counter() - t) / repeats


def part1(device, repeats):
    torch.manual_seed(0)
    makers = {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=3e-3),
        "Muon": lambda ps: Muon(ps),
        "NorMuon": lambda ps: NorMuon(ps),
        "Dion (1/2)": lambda ps: Dion(ps, rank_fraction=0.5),
        "Dion (1/16)": lambda ps: Dion(ps, rank_fraction=1 / 16),
    }
    times = {}
    for name, make in makers.items():
        params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in SHAPES_160M]
        times[name] = time_steps(make(params), params, device, repeats)
    base = times["AdamW"]
    print(f"optimizer step on one 160M block ({device}, {repeats} repeats):")
    for name, t in times.items():
        print(f"  {name:12s} {t * 1e3:9.2f} ms   ×{t / base:7.2f} AdamW")


def part2(device, repeats):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, context=64, n_layer=2, d_model=64, n_head=4, ffn_mult=4)).to(device)
    opts = build_optimizers(model, MuonConfig(name="muon", lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01,
                                              lr_scale="spectral", ns="dion_quintic5", ns_dtype="auto", scalar_lr=0.02,
                                              lion_betas=(0.95, 0.98)))
    x = torch.randint(0, 2048, (32, 65), device=device)
    spent = [0.0]
    original = muon_mod.orthogonalize

    def timed_orth(*a, **k):
        sync(device)
        t = time.perf_counter()
        out = original(*a, **k)
        sync(device)
        spent[0] += time.perf_counter() - t
        return out

    def step():
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)

    step()
    muon_mod.orthogonalize = timed_orth
    try:
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats * 10):
            step()
        sync(device)
        total = time.perf_counter() - t
    finally:
        muon_mod.orthogonalize = original
    print(f"Muon training step of the default CPU model ({device}): {total / (repeats * 10) * 1e3:.1f} ms, "
          f"Newton–Schulz share {spent[0] / total:.1%}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    part1(device, a.repeats)
    part2(device, a.repeats)


if __name__ == "__main__":
    main()
