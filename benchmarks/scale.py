"""Measurement at the field's scale (issue 27): memory and time per checkpoint against model size.

    python benchmarks/scale.py [--layers 2] [--tokens 8192] [--eig 2048,4096,8192] [--quick]

1. Random-init GPT-NeoX models shaped like Pythia 70m, 160m and 410m (d_model, FFN width, heads
   as published; `--layers` blocks each, vocabulary 4096: the FFN measurement does not depend
   on either), measured by the probe as `specdb measure` does (pre and post, four strata, fp64),
   each in its own process: wall time of the forwards + products and of the decomposition, the
   plan's accumulator peak and the process's peak RSS. The 410m shape again with a budget that
   forces passes: the cost of passes, and the spectra equal bitwise.
2. One float64 `eigvalsh` at each D of `--eig` on this CPU (and `--device cuda` where a GPU is).
3. Projections, labelled as such, to every layer of Pythia 1b, 2.8b and an 8B Llama: memory and
   passes from contract.memory (exact arithmetic), time from rates measured here (this CPU) or
   assumed for one H200 (stated in the output).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract import memory as mem  # noqa: E402

# name: (d_model, n_layer, ffn width, heads) as published (Pythia; Llama-3 8B)
SHAPES = {"tiny": (64, 2, 256, 4), "70m": (512, 6, 2048, 8), "160m": (768, 12, 3072, 12), "410m": (1024, 24, 4096, 16),
          "1b": (2048, 16, 8192, 8), "2.8b": (2560, 32, 10240, 32), "llama-8b": (4096, 32, 14336, 32)}
PARAMS = {"tiny": 1e6, "70m": 70e6, "160m": 162e6, "410m": 405e6, "1b": 1.01e9, "2.8b": 2.78e9, "llama-8b": 8.03e9}
STRATA = ("all", "head", "mid", "tail")
CONTEXT, VOCAB = 512, 4096
# One H200 (assumptions, not measurements): FP64 tensor-core peak 67 TFLOP/s at 50 % for the
# products; the eigensolver (cuSOLVER syevd, float64) at an effective 1 TFLOP/s of (4/3)·D³;
# bf16 forwards at 40 % of 790 TFLOP/s; 141 GB of which the default budget takes half.
H200 = {"syrk": 0.5 * 67e12, "eig": 1e12, "forward": 0.4 * 790e12, "memory": 141e9}


def one(name: str, layers: int, tokens: int, memory: int | None, threads: int | None) -> dict:
    """Measure one shape in this process (a fresh one: its peak RSS is its own)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from workers.probe import attach

    if threads:
        torch.set_num_threads(threads)
    d, _, D, heads = SHAPES[name]
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=layers,
                                             num_attention_heads=heads, intermediate_size=D,
                                             max_position_embeddings=CONTEXT)).eval()
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, VOCAB + 1)
    ids = torch.from_numpy(rng.choice(VOCAB, size=(tokens // CONTEXT, CONTEXT), p=p / p.sum()))
    probe = attach(model, token_counts=np.bincount(ids.reshape(-1).numpy(), minlength=VOCAB), memory=memory,
                   min_tokens=16)
    t0 = time.perf_counter()
    with torch.no_grad():
        for part in probe.parts:
            for i in range(0, ids.shape[0], 4):
                with probe.measuring(ids[i:i + 4], part=part):
                    model(input_ids=ids[i:i + 4])
        t1 = time.perf_counter()
        # the last pass's accumulators are decomposed in compute(); earlier passes' inside the loop
        records = probe.compute()
    t2 = time.perf_counter()
    eig = {f"{r.layer}/{r.site}/{r.stratum}": r.eigenvalues.tolist()[:8] for r in records if r.eigenvalues is not None}
    return {"shape": name, "D": D, "layers": layers, "tokens": tokens, "passes": probe.plan.n_passes,
            "plan_peak": probe.plan.peak, "plan_whole": probe.plan.whole, "measure_s": t2 - t0,
            "forward_products_s": t1 - t0, "compute_s": t2 - t1,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "top_eigs": eig}


def child(name, layers, tokens, memory=None, threads=None, here=False) -> dict:
    if here:  # the smoke run: in this process (its peak RSS is then not the shape's own)
        return one(name, layers, tokens, memory, threads)
    args = [sys.executable, __file__, "--one", name, "--layers", str(layers), "--tokens", str(tokens)]
    args += ["--memory", str(memory)] if memory else []
    args += ["--threads", str(threads)] if threads else []
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def eig_time(D: int, device: str) -> float:
    import torch

    x = torch.randn(D, D, dtype=torch.float64, device=device)
    c = x @ x.mT / D
    if device == "cuda":
        torch.linalg.eigvalsh(c[:64, :64])
        torch.cuda.synchronize()
    t = time.perf_counter()
    torch.linalg.eigvalsh(c)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def project(name: str, tokens: int, rates: dict, budget: int) -> dict:
    """Memory (exact, contract.memory) and time (flop counts at `rates`) of one whole checkpoint."""
    d, L, D, _ = SHAPES[name]
    plan = mem.uniform_plan(2 * L, D, STRATA, budget)
    syrk = 2 * L * tokens * D * D               # each position enters one part per layer × site
    eig = 2 * L * len(STRATA) * (4 / 3) * D ** 3
    forward = plan.n_passes * 2 * PARAMS[name] * tokens
    seconds = syrk / rates["syrk"] + eig / rates["eig"] + forward / rates["forward"]
    return {"shape": name, "D": D, "layers": L, "accumulators_gib": plan.whole / mem.GiB, "budget_gib": budget / mem.GiB,
            "passes": plan.n_passes, "pass_peak_gib": plan.peak / mem.GiB, "hours": seconds / 3600,
            "syrk_s": syrk / rates["syrk"], "eig_s": eig / rates["eig"], "forward_s": forward / rates["forward"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--eig", default="2048,4096,8192")
    ap.add_argument("--shapes", default="70m,160m,410m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke run: a D-256 shape, 1 layer, 1024 tokens")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.layers, a.tokens, a.memory, a.threads)))
        return
    if a.quick:
        a.layers, a.tokens, a.eig, a.shapes = 1, 1024, "256", "tiny"
    rows = [child(s, a.layers, a.tokens, threads=a.threads, here=a.quick) for s in a.shapes.split(",")]
    last = rows[-1]
    # the largest shape again, with a budget that holds one layer × site a pass
    tight = mem.pass_bytes([last["D"]], STRATA)
    passes = child(last["shape"], a.layers, a.tokens, memory=tight, threads=a.threads, here=a.quick)
    assert passes["top_eigs"] == last["top_eigs"], "spectra in passes differ from one pass"
    print(f"# measured on this machine: {a.layers} layer(s) per model, {a.tokens} tokens, pre+post × 4 strata, fp64")
    print("shape   D      passes  plan_peak_GiB  peak_RSS_GiB  forward+products_s  decompose_s  per_layer_s")
    for r in rows + [passes]:
        print(f"{r['shape']:7s} {r['D']:<6d} {r['passes']:<7d} {r['plan_peak'] / mem.GiB:<14.3f} "
              f"{r['peak_rss'] / mem.GiB:<13.3f} {r['forward_products_s']:<19.2f} {r['compute_s']:<12.2f} "
              f"{r['measure_s'] / r['layers']:.2f}")
    print(f"passes vs one pass ({last['shape']}): {passes['passes']} passes, wall {passes['measure_s']:.2f} s vs "
          f"{last['measure_s']:.2f} s (ratio {passes['measure_s'] / last['measure_s']:.2f}), peak RSS "
          f"{passes['peak_rss'] / mem.GiB:.2f} vs {last['peak_rss'] / mem.GiB:.2f} GiB; top eigenvalues equal bitwise")
    eig = {int(D): eig_time(int(D), a.device) for D in a.eig.split(",")}
    print("eigvalsh float64, one matrix on " + a.device + ": " +
          ", ".join(f"D {D}: {t:.2f} s ({(4 / 3) * D ** 3 / t / 1e9:.1f} GFLOP/s of 4/3·D³)" for D, t in eig.items()))
    # this CPU's rates, from the largest measured shape (products: 2·L·N·D² multiply-adds)
    D, L, N = last["D"], last["layers"], last["tokens"]
    cpu = {"syrk": 2 * L * N * D * D / last["forward_products_s"],
           "eig": 2 * L * len(STRATA) * (4 / 3) * D ** 3 / last["compute_s"],
           "forward": float("inf")}  # the forwards are inside the products' time here
    print(f"this CPU's rates: products+forwards {cpu['syrk'] / 1e9:.1f} GFLOP/s, eigensolver {cpu['eig'] / 1e9:.1f} GFLOP/s")
    print("# PROJECTION (not measured): every layer, 32768 tokens; memory and passes exact (contract.memory), time from "
          "flop counts at the rates named")
    print("shape     D      layers  accumulators_GiB  where        budget_GiB  passes  pass_peak_GiB  hours")
    for name in ("410m", "1b", "2.8b", "llama-8b"):
        for where, rates, budget in (("this CPU", cpu, mem.default_budget()),
                                     ("one H200", H200, int(mem.DEFAULT_SHARE * H200["memory"]))):
            p = project(name, 32768, rates, budget)
            print(f"{name:9s} {p['D']:<6d} {p['layers']:<7d} {p['accumulators_gib']:<17.1f} {where:12s} "
                  f"{p['budget_gib']:<11.1f} {p['passes']:<7d} {p['pass_peak_gib']:<14.1f} {p['hours']:.2f}")
    print(f"H200 assumptions: {H200}")


if __name__ == "__main__":
    main()
