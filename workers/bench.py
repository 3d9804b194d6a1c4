"""What measurement costs on this device, torch only (no ray, duckdb or pydantic):

    python -m workers.bench [--device auto|cpu|cuda] [--threads 1] [--tokens 32768] [--scaling]

1. One measured step at the default model (2 layers, d_model 64, ffn_mult 8: D = 512) over
   `--tokens` positions in three strata: specdb's path split into forward / accumulate /
   decompose / metrics, beside the previous design (fp64 GEMM per stratum after three boolean
   gathers, host fp64 eigvalsh one matrix at a time) and a naive reference (every activation
   kept, numpy.cov per stratum, numpy eigvalsh), with ratios. Medians of interleaved repeats.
2. Measurement's share of training at ffn_mult 1 and 8, for the default sweep (1000 steps of
   32 × 64 tokens, 6 measured steps over 16,384 held-out tokens) and the previous default (300
   steps, 4 × 32,768): what the training loop waits for (forward passes and products), all of
   specdb's measurement (with the decomposition), and the previous design's.
3. `--scaling`: eigvalsh (fp64, fp32) and the fp64 product per 1,000 tokens at D = 768 … 6144,
   the inputs of the projection in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from contract import metrics
from contract.config import AdamWConfig
from workers import extract, measurement
from workers.model import GPT, GPTConfig
from workers.optim import build_optimizers

from contract.vocabulary import SITES, STRATA  # noqa: E402
ADAMW = AdamWConfig(name="adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-8)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def model_for(ffn_mult: int, device) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=2048, context=64, n_layer=2, d_model=64, n_head=4, ffn_mult=ffn_mult)).to(device)


def previous_design(model, tokens, strata_of, chunk=64):
    """specdb's measurement before issue 9, condensed (head, mid, tail; 'all' was their merge):
    the reference for the speed-up. (layer, site, stratum) → (eigenvalues, metrics)."""
    acc = {}

    def fold(layer, site, act):
        x = act.detach().reshape(-1, act.shape[-1])
        for s in range(3):
            rows = x[labels == s].double()
            if rows.shape[0]:
                mb = rows.mean(0)
                xc = rows - mb
                n0, mean, m2 = acc.get((layer, site, s), (0, torch.zeros_like(mb), 0))
                n = n0 + rows.shape[0]
                delta = mb - mean
                acc[(layer, site, s)] = (n, mean + delta * (rows.shape[0] / n),
                                         m2 + xc.T @ xc + torch.outer(delta, delta) * (n0 * rows.shape[0] / n))

    hooks = []
    for layer, block in enumerate(model.transformer.h):
        hooks.append(block.mlp.c_fc.register_forward_hook(lambda m, i, o, layer=layer: fold(layer, "pre", o)))
        hooks.append(block.mlp.c_proj.register_forward_pre_hook(lambda m, i, layer=layer: fold(layer, "post", i[0])))
    with torch.no_grad():
        for i in range(0, tokens.shape[0], chunk):
            labels = strata_of[tokens[i:i + chunk]].reshape(-1)
            model.hidden(tokens[i:i + chunk])
    for h in hooks:
        h.remove()
    out = {}
    for (layer, site, s), (n, mean, m2) in sorted(acc.items()):
        c = (m2 / (n - 1)).cpu()
        eig = torch.linalg.eigvalsh((c + c.T) / 2).numpy()[::-1].clip(1e-12)
        out[(layer, site, STRATA[1 + s])] = (eig, metrics.metrics(eig))
    return out


def naive(model, tokens, strata_of):
    """Keep every activation (N×D float64 per layer × site), numpy.cov per stratum, eigvalsh:
    (layer, site, stratum) → (eigenvalues, metrics). Also the tests' reference."""
    acts, hooks = {}, []
    for layer, block in enumerate(model.transformer.h):
        hooks.append(block.mlp.c_fc.register_forward_hook(
            lambda m, i, o, layer=layer: acts.setdefault((layer, "pre"), []).append(o.reshape(-1, o.shape[-1]))))
        hooks.append(block.mlp.c_proj.register_forward_pre_hook(
            lambda m, i, layer=layer: acts.setdefault((layer, "post"), []).append(i[0].reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        for i in range(0, tokens.shape[0], 64):
            model.hidden(tokens[i:i + 64])
    for h in hooks:
        h.remove()
    labels = strata_of[tokens].reshape(-1).cpu().numpy()
    out = {}
    for (layer, site), parts in acts.items():
        x = torch.cat(parts).double().cpu().numpy()
        for name, rows in zip(STRATA, (x, x[labels == 0], x[labels == 1], x[labels == 2])):
            eig = np.linalg.eigvalsh(np.cov(rows, rowvar=False))[::-1].clip(1e-12)
            out[(layer, site, name)] = (eig, metrics.metrics(eig))
    return out


def one_step(device, n_tokens: int, repeats: int) -> None:
    model = model_for(8, device).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2048, (n_tokens // 64, 64), generator=gen).to(device)
    strata_of = torch.from_numpy(np.random.default_rng(0).integers(0, 3, 2048)).to(device)
    kw = dict(sites=SITES, strata=STRATA, min_tokens=1000)
    rows: dict[str, list[float]] = {}

    def forward():
        with torch.no_grad():
            for i in range(0, tokens.shape[0], 64):
                model.hidden(tokens[i:i + 64])

    for _ in range(repeats):
        rows.setdefault("forward passes alone", []).append(timed(forward, device)[0])
        t_acc, selected = timed(lambda: measurement.accumulate(model, tokens, strata_of, **kw), device)
        todo = [cov.scaled() for _, cov in selected if cov is not None]
        t_dec, _ = timed(lambda: extract.spectra_of(todo), device)
        t_all, recs = timed(lambda: measurement.measure(model, tokens, strata_of, **kw), device)
        rows.setdefault("specdb: measure() with precision fp32", []).append(
            timed(lambda: measurement.measure(model, tokens, strata_of, precision="fp32", **kw), device)[0])
        t_met, _ = timed(lambda: [metrics.metrics(r.eigenvalues) for r in recs if r.eigenvalues is not None],
                         device)
        rows.setdefault("specdb: accumulate (forward + products)", []).append(t_acc)
        rows.setdefault("specdb: decompose (batched eigvalsh)", []).append(t_dec)
        rows.setdefault("specdb: metrics", []).append(t_met)
        rows.setdefault("specdb: measure() in all", []).append(t_all)
        rows.setdefault("previous design", []).append(timed(lambda: previous_design(model, tokens, strata_of), device)[0])
        rows.setdefault("naive reference", []).append(timed(lambda: naive(model, tokens, strata_of), device)[0])
    med = {k: statistics.median(v) for k, v in rows.items()}
    D = model.cfg.ffn_width
    print(f"one measured step: 2 layers x 2 sites x 4 strata, D = {D}, {n_tokens:,} tokens "
          f"(median of {repeats})")
    for k, v in med.items():
        print(f"  {k:<42} {v:8.3f} s")
    print(f"  previous / specdb measure()                {med['previous design'] / med['specdb: measure() in all']:8.2f}x")
    print(f"  naive / specdb measure()                   {med['naive reference'] / med['specdb: measure() in all']:8.2f}x")
    print(f"  previous / what the loop waits for         "
          f"{med['previous design'] / med['specdb: accumulate (forward + products)']:8.2f}x")


def share(device, repeats: int) -> None:
    """Measurement time over training time for a run of the default sweep (1000 steps, 6 measured
    steps of 16,384 tokens) and of the previous default (300 steps, 4 of 32,768 tokens)."""
    kw = dict(sites=SITES, strata=STRATA, min_tokens=1000)
    print("measurement share of training (batch 32 x 64, AdamW): what the loop waits for / all of "
          "specdb's measurement / the previous design's")
    for mult in (1, 8):
        model = model_for(mult, device)
        opt = build_optimizers(model, ADAMW)[0]
        gen = torch.Generator().manual_seed(1)
        x = torch.randint(0, 2048, (32, 65), generator=gen).to(device)
        strata_of = torch.from_numpy(np.random.default_rng(0).integers(0, 3, 2048)).to(device)

        def step():
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        t_step = statistics.median(timed(step, device)[0] for _ in range(10 * repeats))
        for steps, n_measured, n_tokens in ((1000, 6, 16384), (300, 4, 32768)):
            tokens = torch.randint(0, 2048, (n_tokens // 64, 64), generator=gen).to(device)
            waits, total, before = [], [], []
            for _ in range(repeats):
                t_acc, selected = timed(lambda: measurement.accumulate(model, tokens, strata_of, **kw), device)
                t_dec, _ = timed(lambda: extract.decompose(selected), device)
                waits.append(t_acc)
                total.append(t_acc + t_dec)
                before.append(timed(lambda: previous_design(model, tokens, strata_of), device)[0])
            train_s = steps * t_step
            w, a, b = (n_measured * statistics.median(v) for v in (waits, total, before))
            print(f"  ffn_mult {mult} (D = {model.cfg.ffn_width}), {steps} steps, {n_measured} x {n_tokens:,} tokens: "
                  f"training {train_s:5.1f} s ({t_step * 1e3:.1f} ms/step); measurement {w:5.2f} s = "
                  f"{100 * w / train_s:4.1f}% / {a:5.2f} s = {100 * a / train_s:4.1f}% / {b:5.2f} s = "
                  f"{100 * b / train_s:4.1f}%")


def scaling(device) -> None:
    print("eigvalsh of one D x D covariance, and the fp64 product (SYRK on a CPU) per 1,000 tokens")
    for D in (768, 1536, 3072, 6144):
        x = torch.randn(2 * D, D, dtype=torch.float64, device=device)
        c = torch.triu(x.mT @ x / (2 * D))
        t64, _ = timed(lambda: torch.linalg.eigvalsh(c, UPLO="U"), device)
        c32 = c.float()
        t32, _ = timed(lambda: torch.linalg.eigvalsh(c32, UPLO="U"), device)
        rows = torch.randn(4096, D, dtype=torch.float64, device=device)
        extract.gram(rows)
        tg, _ = timed(lambda: extract.gram(rows), device)
        print(f"  D = {D:5d}: eigvalsh fp64 {t64:7.3f} s, fp32 {t32:7.3f} s; product {tg / 4.096:7.4f} s "
              f"per 1,000 tokens ({2 * 4096 * D * D / 2 / tg / 1e9:5.1f} GFLOP/s useful)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--skip-share", action="store_true")
    a = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    torch.set_num_threads(a.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {a.threads} thread(s)"
    print(f"workers.bench on {name}; torch {torch.__version__}")
    with threadpool_limits(a.threads, user_api="blas"):
        one_step(device, a.tokens, a.repeats)
        if not a.skip_share:
            share(device, max(1, a.repeats // 2))
        if a.scaling:
            scaling(device)


if __name__ == "__main__":
    main()
