"""What the probe costs (issue 18's goals), measured side by side in one process.

    python benchmarks/probe.py [--steps 40] [--repeats 5] [--threads N] [--compile inductor]

1. Training steps with a probe attached but not measuring, against the same steps without one
   (interleaved, median of --repeats): the idle overhead, whose goal is ≤ 1 %; with `--compile`,
   of blocks compiled in place (the probe installs no hook outside `measuring()`, so compiled
   steps run their graphs unchanged).
2. One checkpoint's full measurement — 32,768 tokens at D = 1024, two layers, pre and post, four
   strata — by the probe, against a naive reference that buffers every activation and calls
   `numpy.cov` and `numpy.linalg.eigvalsh` per layer × site × stratum (what NerVE-style tools do).
   Both compute the same metric suite; the spectra are checked to agree.
3. One measured step of specdb's own loop through the probe (`workers.measurement.measure`) against
   the probe driven directly by a user's loop: the same code path, so the same cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from contract import metrics
from contract.sizes import frequency_strata
from workers import extract, measurement
from workers.model import GPT, GPTConfig
from workers.probe import attach

V, T, D_MODEL, MULT, LAYERS = 4096, 256, 256, 4, 2  # D = 1024
TOKENS = 32768
CHUNK = 64  # sequences per forward, as specdb's own loop (workers.measurement.accumulate)


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, context=T, n_layer=LAYERS, d_model=D_MODEL, n_head=4, ffn_mult=MULT))
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, V + 1)
    ids = torch.from_numpy(rng.choice(V, size=(TOKENS // T, T), p=p / p.sum()))
    counts = np.bincount(ids.reshape(-1).numpy(), minlength=V)
    return model, ids, counts


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def idle_overhead(steps: int, repeats: int, backend: str | None = None) -> tuple[float, float]:
    model, ids, counts = model_and_data()
    if backend:  # as torchtitan compiles: every block in place
        for block in model.transformer.h:
            block.compile(backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = ids[:8]

    def train():
        for _ in range(steps):
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()

    bare, probed = [], []
    probe = attach(model, token_counts=counts)
    train()  # warm up
    for i in range(repeats):  # alternate which goes first, so a drifting clock favours neither
        for attached in ((False, True) if i % 2 == 0 else (True, False)):
            if attached:
                with probe:  # attached; hooks exist only inside probe.measuring(), never entered here
                    probed.append(timed(train))
            else:
                bare.append(timed(train))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0, f"{hooks} hooks left on the model"
    return statistics.median(bare), statistics.median(probed)


def probe_measurement(model, ids, counts):
    probe = attach(model, token_counts=counts, min_tokens=1000)
    with torch.no_grad():
        for i in range(0, ids.shape[0], CHUNK):
            with probe.measuring(ids[i:i + CHUNK]):
                model.hidden(ids[i:i + CHUNK])
    return probe.compute()


def naive_measurement(model, ids, counts):
    """Buffer every activation, then numpy.cov and eigvalsh per layer × site × stratum."""
    strata = frequency_strata(counts)[ids.reshape(-1).numpy()]
    acts, hooks = {}, []
    for layer, block in enumerate(model.transformer.h):
        hooks.append(block.mlp.c_fc.register_forward_hook(
            lambda m, i, o, layer=layer: acts.setdefault((layer, "pre"), []).append(o.detach().reshape(-1, o.shape[-1]))))
        hooks.append(block.mlp.c_proj.register_forward_pre_hook(
            lambda m, i, layer=layer: acts.setdefault((layer, "post"), []).append(i[0].detach().reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        for i in range(0, ids.shape[0], CHUNK):
            model.hidden(ids[i:i + CHUNK])
    for h in hooks:
        h.remove()
    out = {}
    for (layer, site), chunks in acts.items():
        x = torch.cat(chunks).double().numpy()
        for name, rows in (("all", x), ("head", x[strata == 0]), ("mid", x[strata == 1]), ("tail", x[strata == 2])):
            eig = np.sort(np.linalg.eigvalsh(np.cov(rows, rowvar=False)))[::-1]
            out[(layer, site, name)] = (eig, metrics.metrics(eig))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parts", default="1,2,3", help="which of the three measurements to run")
    ap.add_argument("--compile", default=None, help="1. with the blocks compiled by this backend (inductor, aot_eager)")
    a = ap.parse_args()
    parts = {int(p) for p in a.parts.split(",")}
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model d_model {D_MODEL}, "
          f"D {D_MODEL * MULT}, {LAYERS} layers, context {T}")

    if 1 in parts:
        bare, probed = idle_overhead(a.steps, a.repeats, a.compile)
        print(f"\n1. idle{' (blocks compiled: ' + a.compile + ')' if a.compile else ''}: {a.steps} training steps "
              f"(batch 8 × {T}), median of {a.repeats}: "
              f"without a probe {bare:.3f} s, with one attached {probed:.3f} s → overhead {100 * (probed / bare - 1):+.2f} %")
    if parts == {1}:
        return
    model, ids, counts = model_and_data(1)
    model.eval()
    probe_measurement(model, ids[:16], counts)  # warm up
    t_probe = min(timed(lambda: probe_measurement(model, ids, counts)) for _ in range(2))
    t_naive = min(timed(lambda: naive_measurement(model, ids, counts)) for _ in range(2))
    recs = {(r.layer, r.site, r.stratum): r for r in probe_measurement(model, ids, counts)}
    ref = naive_measurement(model, ids, counts)
    worst = max(float(np.max(np.abs(recs[k].eigenvalues[:64] - e[:64]) / e[:64])) for k, (e, _) in ref.items())
    print(f"\n2. a checkpoint's measurement, {TOKENS:,} tokens at D = {D_MODEL * MULT} (2 layers × pre/post × 4 strata):")
    print(f"   probe (streaming SYRK, batched eigvalsh)   {t_probe:7.2f} s")
    print(f"   naive (buffer, numpy.cov, eigvalsh)        {t_naive:7.2f} s")
    print(f"   naive / probe = {t_naive / t_probe:.2f}×; largest relative difference of the top 64 eigenvalues "
          f"{worst:.1e}")

    strata_of = torch.from_numpy(frequency_strata(counts).astype(np.int64))
    kw = dict(sites=["pre", "post"], strata=["all", "head", "mid", "tail"], min_tokens=1000)
    own = min(timed(lambda: measurement.measure(model, ids, strata_of, **kw)) for _ in range(3))
    direct = min(timed(lambda: probe_measurement(model, ids, counts)) for _ in range(3))
    print(f"\n3. one measured step: specdb's loop (measurement.measure) {own:.2f} s, the probe driven by a user's "
          f"loop {direct:.2f} s → ratio {direct / own:.2f} (one code path)")


if __name__ == "__main__":
    main()
