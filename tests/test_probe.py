"""The probe on models it did not train: tiny random HF GPT-2, GPT-NeoX and Llama built here
(nothing downloads), against plain forward hooks and numpy."""

import math

import numpy as np
import pytest
import torch

from workers.extract import NonFiniteActivations
from workers.probe import ProbeError, attach, find_sites, strata_table


V, T = 64, 12


def hf():
    """transformers, imported when a test first builds a model (not while collecting)."""
    return pytest.importorskip("transformers")


def gpt2():
    cfg = hf().GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return hf().GPT2LMHeadModel(cfg)


def neox():
    cfg = hf().GPTNeoXConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=40, max_position_embeddings=32)
    return hf().GPTNeoXForCausalLM(cfg)


def llama():
    cfg = hf().LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return hf().LlamaForCausalLM(cfg)


MODELS = {  # builder, expected (pre, post) of layer 1, gated
    "gpt2": (gpt2, ("transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"), False),
    "neox": (neox, ("gpt_neox.layers.1.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_4h_to_h"), False),
    "llama": (llama, ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"), True),
}


def build(name):
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    return model.double()  # float64 activations: the reference and the probe see the same numbers


def reference(model, ids, mask=None, select=None):
    """(layer, site) → eigenvalues (descending) of the plain covariance of the unpadded positions
    (or of those `select` marks)."""
    modules = dict(model.named_modules())
    acts, hooks = {}, []
    for site in find_sites(model):
        hooks.append(modules[site.pre].register_forward_hook(
            lambda m, i, o, layer=site.layer: acts.__setitem__((layer, "pre"), o.detach())))
        hooks.append(modules[site.post].register_forward_pre_hook(
            lambda m, i, layer=site.layer: acts.__setitem__((layer, "post"), i[0].detach())))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    chosen = select if select is not None else mask
    keep = np.ones(ids.numel(), bool) if chosen is None else chosen.reshape(-1).numpy().astype(bool)
    out = {}
    for key, a in acts.items():
        x = a.reshape(-1, a.shape[-1]).numpy()[keep]
        out[key] = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    return out


def probed(model, batches, **kw):
    probe = attach(model, strata=("all",), min_tokens=2, **kw)
    with torch.no_grad():
        for ids, mask in batches:
            with probe.measuring(ids, mask):
                model(input_ids=ids, attention_mask=mask)
    return {(r.layer, r.site): r for r in probe.compute(step=7)}


def assert_same_spectrum(got, want, rtol=1e-9):
    top = want > want[0] * 1e-8  # the numerically meaningful part (tiny eigenvalues are rounding noise)
    np.testing.assert_allclose(got[: top.sum()], want[top], rtol=rtol)


@pytest.mark.parametrize("name", MODELS)
def test_the_ffn_sites_are_found(name):
    model = build(name)
    sites = find_sites(model)
    assert len(sites) == 2 and (sites[1].pre, sites[1].post) == MODELS[name][1]
    assert all(s.gated == MODELS[name][2] for s in sites)


@pytest.mark.parametrize("name", MODELS)
def test_the_probe_equals_plain_hooks_and_numpy(name):
    model = build(name)
    ids = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(1))
    want = reference(model, ids)
    got = probed(model, [(ids, None)])
    assert set(got) == set(want) == {(l, s) for l in (0, 1) for s in ("pre", "post")}
    for key, rec in got.items():
        assert rec.step == 7 and rec.n_tokens == ids.numel() and rec.metrics["hard_rank"] > 1
        assert_same_spectrum(rec.eigenvalues, want[key])


@pytest.mark.parametrize("name", MODELS)
def test_padded_positions_never_enter_a_covariance(name):
    model = build(name)
    ids = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[::2, -5:] = 0  # right padding on half the rows
    got = probed(model, [(ids, mask)])
    want = reference(model, ids, mask)
    for key, rec in got.items():
        assert rec.n_tokens == int(mask.sum())
        assert_same_spectrum(rec.eigenvalues, want[key])
    unmasked = probed(model, [(ids, None)])
    assert not np.allclose(unmasked[(1, "post")].eigenvalues[:3], got[(1, "post")].eigenvalues[:3])


@pytest.mark.parametrize("name", MODELS)
def test_two_micro_batches_equal_one_batch(name):
    model = build(name)
    ids = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(3))
    one = probed(model, [(ids, None)])
    two = probed(model, [(ids[:3], None), (ids[3:], None)])
    for key in one:
        assert two[key].n_tokens == one[key].n_tokens
        np.testing.assert_allclose(two[key].eigenvalues, one[key].eigenvalues, rtol=1e-10, atol=1e-14)


def test_a_token_budget_counts_the_first_unpadded_positions_only():
    model = build("gpt2")
    ids = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    probe = attach(model, strata=("all",), min_tokens=2)
    with torch.no_grad():
        with probe.measuring(ids, mask, limit=20):
            model(input_ids=ids, attention_mask=mask)
        assert probe.counted == 20
        with probe.measuring(ids, mask, limit=0):
            model(input_ids=ids, attention_mask=mask)
        assert probe.counted == 0
    valid = mask.reshape(-1).bool()
    first_20 = (valid & (torch.cumsum(valid.long(), 0) <= 20)).reshape(ids.shape)  # row 0's 7, row 1's 12, row 2's 1
    want = reference(model, ids, mask, select=first_20)
    got = {(r.layer, r.site): r for r in probe.compute()}
    for key, rec in got.items():
        assert rec.n_tokens == 20
        assert_same_spectrum(rec.eigenvalues, want[key])


def test_strata_come_from_a_token_count_table():
    model = build("gpt2")
    counts = np.arange(V, 0, -1) ** 2  # id 0 the most frequent
    table = strata_table(counts)
    probe = attach(model, token_counts=counts, min_tokens=2)
    ids = torch.randint(0, V, (16, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), probe.measuring(ids):
        model(input_ids=ids)
    recs = {(r.layer, r.site, r.stratum): r for r in probe.compute()}
    labels = table[ids].reshape(-1)
    for s, name in enumerate(("head", "mid", "tail")):
        assert recs[(0, "pre", name)].n_tokens == int((labels == s).sum())
    assert recs[(0, "pre", "all")].n_tokens == ids.numel()


def test_a_model_with_no_ffn_is_one_line_naming_what_it_saw():
    model = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V))
    with pytest.raises(ProbeError) as err:
        attach(model)
    message = str(err.value)
    assert "no FFN found in Sequential" in message and "modules seen: 0, 1" in message and "\n" not in message


def test_explicit_patterns_cover_any_other_model():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 24), torch.nn.Linear(24, 8)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    model = torch.nn.Sequential(torch.nn.Embedding(V, 8), Block(), Block())
    probe = attach(model, patterns=(r"\d+\.up", r"\d+\.down"), min_tokens=2)
    ids = torch.randint(0, V, (6, T))
    with torch.no_grad(), probe.measuring(ids):
        model(ids)
    recs = probe.compute()
    # layer ids come from the module names (`1.up`, `2.up`: the Sequential's indices)
    assert {(r.layer, r.site) for r in recs} == {(1, "pre"), (1, "post"), (2, "pre"), (2, "post")}
    assert all(r.n_dim == 24 for r in recs)


def test_a_token_table_of_another_vocabulary_is_refused():
    model = build("gpt2")
    probe = attach(model, token_strata=np.zeros(10, dtype=np.int64), min_tokens=2)
    with pytest.raises(ProbeError, match="covers 10 token ids but the input holds id"):
        with probe.measuring(torch.full((2, T), 20)):
            model(input_ids=torch.full((2, T), 20))


def test_nan_activations_are_non_finite_not_a_spectrum():
    model = build("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[0, 0] = math.nan
    probe = attach(model, min_tokens=2)
    ids = torch.randint(0, V, (4, T))
    with torch.no_grad(), probe.measuring(ids):
        model(input_ids=ids)
    with pytest.raises(NonFiniteActivations):
        probe.compute()


def first(out):
    return out[0] if isinstance(out, tuple) else out


def test_no_hook_is_left_between_measurements_and_recomputation_does_not_count():
    from torch.utils.checkpoint import checkpoint

    model = build("gpt2").train()
    blocks = model.transformer.h
    assert all(not b.mlp.c_fc._forward_hooks for b in blocks)
    probe = attach(model, strata=("all",), min_tokens=2)
    ids = torch.randint(0, V, (4, T))
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(T))
    with probe.measuring(ids):
        y = x
        for block in blocks:  # each block recomputed during backward, inside the measuring block
            y = checkpoint(lambda h, b=block: first(b(h)), y, use_reentrant=False)
        y.sum().backward()
    assert all(not b.mlp.c_fc._forward_hooks for b in blocks)
    assert {r.n_tokens for r in probe.compute()} == {ids.numel()}  # counted once, not twice


def _ranks(rank, world, out_dir):
    """One rank of the gloo test: measure its half of the rows; the reduction pools them."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=world)
    try:
        model = build("gpt2")
        ids = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(5))
        counts = np.arange(1, V + 1, dtype=np.float64) * (rank + 1) ** 3 * (1 if rank == 0 else -1) % 97 + 1
        for scope in ("global", "rank0_local"):
            np.save(out_dir / f"table-{scope}-{rank}.npy", strata_table(counts, scope=scope).numpy())
        probe = attach(model, strata=("all",), min_tokens=2)
        with torch.no_grad(), probe.measuring(ids[rank * 4:(rank + 1) * 4]):
            model(input_ids=ids[rank * 4:(rank + 1) * 4])
        recs = probe.compute()
        np.save(out_dir / f"eig-{rank}.npy", np.stack([r.eigenvalues for r in recs]))
        np.save(out_dir / f"n-{rank}.npy", np.array([r.n_tokens for r in recs]))
        dist.barrier()  # neither rank tears gloo down while the other still talks
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_the_reduction_across_two_gloo_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from contract.sizes import frequency_strata

    mp.spawn(_ranks, args=(2, tmp_path), nprocs=2, join=True)  # a file rendezvous: no port to race for
    model = build("gpt2")
    ids = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(5))
    single = probed(model, [(ids, None)])
    want = np.stack([single[k].eigenvalues for k in sorted(single, key=lambda k: (k[0], k[1] != "pre"))])
    for rank in (0, 1):
        got = np.load(tmp_path / f"eig-{rank}.npy")
        assert list(np.load(tmp_path / f"n-{rank}.npy")) == [ids.numel()] * 4
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * want.max())
    counts = [np.arange(1, V + 1, dtype=np.float64) * (r + 1) ** 3 * (1 if r == 0 else -1) % 97 + 1 for r in (0, 1)]
    for rank in (0, 1):
        assert np.array_equal(np.load(tmp_path / f"table-global-{rank}.npy"), frequency_strata(counts[0] + counts[1]))
        assert np.array_equal(np.load(tmp_path / f"table-rank0_local-{rank}.npy"), frequency_strata(counts[0]))


@pytest.mark.parametrize("table, message", [
    (dict(token_counts=np.array([1.0, np.nan] * (V // 2))), "token counts: expected one finite count"),
    (dict(token_counts=-np.ones(V)), "negative"),
    (dict(token_counts=np.ones((2, V))), "shape"),
    (dict(token_strata=np.full(V, 5)), "token strata: expected one stratum per token id"),
    (dict(token_strata=np.zeros((2, V), dtype=np.int64)), "token strata"),
])
def test_a_hostile_token_table_is_one_line(table, message):
    model = build("gpt2")
    with pytest.raises(ProbeError, match=message) as err:
        attach(model, **table)
    assert "\n" not in str(err.value)
