"""FFN layouts beyond a plain [b, s, h] projection (issue 29): Megatron-core's sequence-first
activations with their unadded bias and per-rank fused gate (a faithful module tree,
tests/megatron.py), a sequence-first activation nobody declared, and T5's encoder and decoder as
separate layer sets."""

import numpy as np
import pytest
import torch

from tests.test_families import V, WIDTH, Titan, t5
from workers.probe import ProbeError, attach, find_sites


def _per_stratum(x, labels):
    out = {}
    for s, name in enumerate(("head", "mid", "tail")):
        rows = x[labels == s]
        out[name] = np.sort(np.linalg.eigvalsh(np.cov(rows, rowvar=False)))[::-1].clip(1e-12)
    return out


@pytest.mark.parametrize("gated", [True, False])
def test_megatron_fused_sequence_first_ffns_are_measured_by_stratum_in_input_order(gated):
    """Megatron's `linear_fc1` returns (output, bias) unadded, fuses gate and up per rank and runs
    sequence-first [s, b, h]: `pre` is output + bias (its gate half when gated, as the config
    says), and each position keeps its own token's stratum (a batch-first flattening would mix them)."""
    from tests.megatron import FFN, MegatronGPT

    model = MegatronGPT(gated=gated).double()
    sites = find_sites(model)
    assert [(s.layer, s.pre, s.post, s.gated, s.fused, s.sequence_first) for s in sites][1] == \
        (1, "decoder.layers.1.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc2", gated, "per_rank" if gated else "",
         True)
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(3))
    strata = np.arange(V) % 3
    acts = {}
    mlp = model.decoder.layers[1].mlp
    hooks = [mlp.linear_fc1.register_forward_hook(lambda m, i, o: acts.__setitem__("pre", o[0] + o[1])),
             mlp.linear_fc2.register_forward_pre_hook(lambda m, i: acts.__setitem__("post", i[0]))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    probe = attach(model, token_strata=strata, min_tokens=2)
    with torch.no_grad(), probe.measuring(ids):
        model(ids)
    got = {(r.layer, r.site, r.stratum): r for r in probe.compute()}
    labels = strata[ids.reshape(-1).numpy()]
    for name in ("pre", "post"):
        act = acts[name][..., :FFN] if name == "pre" else acts[name]  # the gate: the first half
        x = act.transpose(0, 1).reshape(-1, FFN).detach().numpy()   # [s, b, h] → input_ids' order
        for stratum, want in _per_stratum(x, labels).items():
            rec = got[(1, name, stratum)]
            assert rec.n_dim == FFN and rec.n_tokens == int((labels == "head mid tail".split().index(stratum)).sum())
            np.testing.assert_allclose(rec.eigenvalues, want, rtol=1e-9, atol=1e-12 * want.max())


def test_sequence_first_activations_named_by_patterns_are_refused_until_declared():
    from tests.megatron import MegatronGPT

    model = MegatronGPT(gated=False).double()
    patterns = (r"decoder\.layers\.\d+\.mlp\.linear_fc1", r"decoder\.layers\.\d+\.mlp\.linear_fc2")
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(3))
    probe = attach(model, patterns=patterns, strata=("all",), min_tokens=2)
    with pytest.raises(ProbeError, match=r"site pre of layer 0 \(decoder.layers.0.mlp.linear_fc1\): activations are "
                                         r"20×3×h for input_ids of 3×20: sequence-first \[s, b, h\]; pass "
                                         r"sequence_first=True"), torch.no_grad(), probe.measuring(ids):
        model(ids)
    declared = attach(model, patterns=patterns, sequence_first=True, token_strata=np.arange(V) % 3, min_tokens=2)
    found = attach(model, token_strata=np.arange(V) % 3, min_tokens=2)
    for probe in (declared, found):
        with torch.no_grad(), probe.measuring(ids):
            model(ids)
    for a, b in zip(declared.compute(), found.compute()):
        assert (a.layer, a.site, a.stratum) == (b.layer, b.site, b.stratum)
        np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    with pytest.raises(ProbeError, match="sequence-first activations \\[s, b, h\\] should be 20×3×h"), \
            torch.no_grad(), found.measuring(ids):
        model(ids[:2])  # forwards of another batch than the one measuring() labelled


def test_t5_encoder_and_decoder_are_separate_layer_sets_each_labelled_by_its_own_tokens():
    """`stack` keeps one of T5's layer sets, numbered from 0 within it; the decoder's positions are
    labelled by the decoder's own input ids (not the encoder's)."""
    from workers.sites import stacks

    torch.manual_seed(0)
    model = t5("relu").eval().double()
    names = [s.pre for s in find_sites(model)]
    assert stacks(names) == ["encoder", "encoder", "decoder", "decoder"]
    assert stacks(["model.layers.0.mlp.c_fc", "model.layers.1.mlp.c_fc"]) == ["", ""]
    enc, dec = attach(model, stack="encoder", strata=("all",), min_tokens=2), \
        attach(model, stack="decoder", token_strata=np.arange(V) % 3, min_tokens=2)
    assert [(s.layer, s.pre.split(".")[0]) for s in enc.sites] == [(0, "encoder"), (1, "encoder")]
    assert [(s.layer, s.pre.split(".")[0]) for s in dec.sites] == [(0, "decoder"), (1, "decoder")]
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1))
    decoder_ids = torch.randint(0, V, (4, 30), generator=torch.Generator().manual_seed(2))
    acts = {}
    wi = model.decoder.block[1].layer[2].DenseReluDense.wi
    hook = wi.register_forward_hook(lambda m, i, o: acts.__setitem__("pre", o.detach()))
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=decoder_ids)
    hook.remove()
    with torch.no_grad(), dec.measuring(decoder_ids):
        model(input_ids=ids, decoder_input_ids=decoder_ids)
    got = {(r.layer, r.site, r.stratum): r for r in dec.compute()}
    labels = (np.arange(V) % 3)[decoder_ids.reshape(-1).numpy()]
    for stratum, want in _per_stratum(acts["pre"].reshape(-1, WIDTH).numpy(), labels).items():
        np.testing.assert_allclose(got[(1, "pre", stratum)].eigenvalues, want, rtol=1e-9, atol=1e-12 * want.max())
    with pytest.raises(ProbeError, match=r"stack: 'middle' is not one of this model's layer sets \(decoder, encoder\)"):
        attach(model, stack="middle")
    with pytest.raises(ProbeError, match="it has one, unnamed"):
        attach(Titan(), stack="encoder")
