"""Sharded accumulators under torch.distributed (issue 27): each layer × site has one owner rank,
every rank's per-chunk moments are reduced to it as they are made, and the spectra equal the
unsharded reduction (gloo, 2 and 3 processes)."""

import numpy as np
import pytest
import torch

from contract import memory as mem
from tests.conftest import tiny_model
from workers.probe import attach

pytestmark = pytest.mark.slow  # several processes

V, T = 64, 12


def build():
    return tiny_model(n_layer=3, ffn_mult=3).eval().double()  # D 48


def measure(model, batches, **kw):
    """Spectra of `batches` (one measuring block each) and the accumulator bytes held at the end."""
    probe = attach(model, token_strata=np.arange(V) % 3, min_tokens=2, **kw)
    held = 0
    for part in probe.parts:
        for ids in batches:
            with torch.no_grad(), probe.measuring(ids, part=part):
                model.hidden(ids)
        held = max(held, sum(c.m2.nbytes + c.mean.nbytes for c in probe.acc.values()))
    return probe.compute(step=5), held


def _rank(rank, world, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=world)
    try:
        model = build()
        ids = torch.randint(0, V, (6 * world, T), generator=torch.Generator().manual_seed(7))
        mine = ids[rank * 6:(rank + 1) * 6]
        batches = [mine[:4], mine[4:]]  # two forwards per rank: micro-batches merge
        for name, kw in (("plain", {}), ("shard", {"shard": True}),
                         ("shard-passes", {"shard": True, "memory": mem.pass_bytes([48] * 2, ("all", "head", "mid", "tail"))})):
            recs, held = measure(model, batches, **kw)
            np.save(out_dir / f"{name}-{rank}.npy", np.concatenate([r.eigenvalues for r in recs if r.eigenvalues is not None]))
            np.save(out_dir / f"{name}-keys-{rank}.npy", np.array([f"{r.layer}/{r.site}/{r.stratum}/{r.n_tokens}/"
                                                                   f"{r.eigenvalues is None}" for r in recs]))
            np.save(out_dir / f"{name}-held-{rank}.npy", np.array([held]))
            np.save(out_dir / f"{name}-js-{rank}.npy", np.array([r.reinjection["js_divergence"] for r in recs
                                                                  if r.reinjection is not None]))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_accumulators_equal_the_unsharded_reduction_and_each_rank_holds_a_share(world, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(world, tmp_path), nprocs=world, join=True)
    model = build()
    ids = torch.randint(0, V, (6 * world, T), generator=torch.Generator().manual_seed(7))
    single, whole = measure(model, [ids])
    want = np.concatenate([r.eigenvalues for r in single if r.eigenvalues is not None])
    keys = [f"{r.layer}/{r.site}/{r.stratum}/{r.n_tokens}/{r.eigenvalues is None}" for r in single]
    for rank in range(world):
        plain = np.load(tmp_path / f"plain-{rank}.npy")
        for name in ("shard", "shard-passes"):
            assert list(np.load(tmp_path / f"{name}-keys-{rank}.npy")) == keys  # every rank, every record, in order
            got = np.load(tmp_path / f"{name}-{rank}.npy")
            np.testing.assert_allclose(got, plain, rtol=1e-12, atol=1e-12 * plain.max())
            np.testing.assert_allclose(np.load(tmp_path / f"{name}-js-{rank}.npy"),
                                       np.load(tmp_path / f"plain-js-{rank}.npy"), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(plain, want, rtol=1e-9, atol=1e-12 * want.max())
    held = {name: [int(np.load(tmp_path / f"{name}-held-{r}.npy")[0]) for r in range(world)]
            for name in ("plain", "shard", "shard-passes")}
    assert held["plain"] == [whole] * world  # unsharded: every rank holds every accumulator
    units = 3 * 2
    for r, h in enumerate(held["shard"]):  # round-robin owners: ⌈6/W⌉ or ⌊6/W⌋ of 6 layer × sites
        assert h == whole * len(range(r, units, world)) // units
    assert sum(held["shard"]) == whole
    assert max(held["shard-passes"]) <= whole * 2 // units  # passes of two units, one or two per rank
