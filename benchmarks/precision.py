"""What float32 would cost each stored metric, on real spectra (the precision policy's evidence).

    python benchmarks/precision.py [--cache /tmp/specdb-precision] [--threads 1]

Trains three runs of the default sweep's configuration to their last step and keeps their
weights (AdamW and Muon at ffn_mult 8, 1000 steps: D = 512; Muon at d_model 128, ffn_mult 8,
300 steps: D = 1024), then measures each on the default held-out batch (16,384 tokens) with
every precision variant and prints the largest relative difference from the fp64 reference
per metric, over every layer × site × stratum:

  fp32 products   each chunk's centred product in fp32, fold and eigensolver in fp64 (precision: fp32)
  fp32 eigvalsh   fp64 products, the eigensolver in fp32
  fp32 both       both in fp32
  tf32 products   as fp32 products with inputs cut to TF32's 10 mantissa bits (a GPU's TF32 matmul)
  previous fp64   the measurement before issue 9 (fp64 GEMMs, one eigvalsh per matrix), head/mid/tail

Weights are cached under --cache, so a second call only measures.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from spectraldb.spec import load_spec
from workers import extract, measurement
from workers.bench import previous_design
from workers.data import measurement_batch, prepare
from workers.model import GPT, GPTConfig
from workers.train import run as train_run

RUNS = (("AdamW", 8.0, 64, 1000), ("Muon", 8.0, 64, 1000), ("Muon", 8.0, 128, 300))
KW = dict(sites=("pre", "post"), strata=("all", "head", "mid", "tail"))


def trained(label, mult, d_model, steps, cache: Path, threads: int):
    plan, _ = load_spec("experiments.yaml", [f"model.d_model={d_model}", f"train.steps={steps}"])
    run = next(r for r in plan.runs if r.label == label and r.model.ffn_mult == mult)
    config = run.worker_config()
    ds = prepare(config.data)
    ckpt = cache / f"{label}-{mult:g}-{d_model}-{steps}.pt"
    if not ckpt.exists():  # the checkpoint of step steps-1 holds the weights of the last update but one
        config = replace(config, checkpoint_every=steps - 1)
        print(f"training {label} ffn_mult {mult:g} d_model {d_model} for {steps} steps …", flush=True)
        train_run(config, ds, threads=threads, checkpoint=ckpt)
    model = GPT(GPTConfig.from_run(config, ds.vocab_size))
    model.load_state_dict(torch.load(ckpt, weights_only=False)["model"])
    tokens = torch.from_numpy(measurement_batch(ds, config.measure.tokens, config.data.context).astype(np.int64))
    return model, tokens, torch.from_numpy(ds.strata.astype(np.int64)), config.measure.min_stratum_tokens


def tf32_gram(xc):
    cut = (xc.view(torch.int32) & ~((1 << 13) - 1)).view(torch.float32)  # 23 → 10 mantissa bits
    return GRAM(cut)


GRAM = extract.gram


def variant(model, tokens, strata_of, min_tokens, accumulate, decompose, tf32=False):
    extract.PRECISIONS["bench"] = extract.Precision(accumulate, decompose)
    extract.gram = tf32_gram if tf32 else GRAM
    try:
        recs = measurement.measure(model, tokens, strata_of, min_tokens=min_tokens, precision="bench", **KW)
    finally:
        extract.gram = GRAM
    return {(r.layer, r.site, r.stratum): r.to_dict() for r in recs if r.eigenvalues is not None}


def worst(ref: dict, got: dict, into: dict) -> None:
    for key, a in ref.items():
        b = got.get(key)
        if b is None:
            continue
        for name, value in a["metrics"].items():
            into[name] = max(into.get(name, 0.0), abs(b["metrics"][name] - value) / abs(value))
        for name, value in a.get("reinjection", {}).items():
            if "reinjection" in b:
                into[name] = max(into.get(name, 0.0), abs(b["reinjection"][name] - value) / max(abs(value), 1e-300))
        ea, eb = a["eigenvalues"], b["eigenvalues"]
        top = ea > ea[0] * 1e-6
        into["eigenvalues ≥ 1e-6·λmax"] = max(into.get("eigenvalues ≥ 1e-6·λmax", 0.0),
                                              float(np.max(np.abs(eb[top] - ea[top]) / ea[top])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/specdb-precision")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    f32, f64 = torch.float32, torch.float64
    columns = {"fp32 products": (f32, f64, False), "fp32 eigvalsh": (f64, f32, False),
               "fp32 both": (f32, f32, False), "tf32 products": (f32, f64, True)}
    table: dict[str, dict] = {name: {} for name in [*columns, "previous fp64"]}
    with threadpool_limits(a.threads, user_api="blas"):
        for spec in RUNS:
            model, tokens, strata_of, min_tokens = trained(*spec, cache, a.threads)
            ref = variant(model, tokens, strata_of, min_tokens, f64, f64)
            for name, (acc, dec, tf32) in columns.items():
                worst(ref, variant(model, tokens, strata_of, min_tokens, acc, dec, tf32), table[name])
            old = {k: {"metrics": m, "eigenvalues": e} for k, (e, m) in previous_design(model, tokens, strata_of).items()}
            worst({k: {"metrics": v["metrics"], "eigenvalues": v["eigenvalues"]} for k, v in ref.items() if k in old},
                  old, table["previous fp64"])
            print(f"measured {spec[0]} ffn_mult {spec[1]:g} d_model {spec[2]} (D = {model.cfg.ffn_width})", flush=True)
    metrics = list(table["fp32 products"])
    print("\nlargest relative difference from fp64, over every layer x site x stratum of the runs above")
    print("| metric | " + " | ".join(table) + " |")
    print("|---" * (len(table) + 1) + "|")
    for m in metrics:
        print(f"| {m} | " + " | ".join(f"{table[c].get(m, float('nan')):.1e}" for c in table) + " |")


if __name__ == "__main__":
    main()
