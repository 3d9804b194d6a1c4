"""Architecture factors (docs/design.md §2): each does what it says, and impossible ones are spec errors."""

import pytest
import torch

from spectraldb.errors import SpecError
from spectraldb.spec import RunSpec, load_spec
from workers.model import GPT, Block, GPTConfig
from workers.optim import build_optimizers, route_parameters
from tests.conftest import ADAMW, DION, MUON, NORMUON, tiny_model


def make(**kw):
    return tiny_model(**{"vocab_size": 40, "context": 12, **kw})


def test_nope_without_causal_mask_is_permutation_equivariant():
    model = make(pos="nope")
    for block in model.transformer.h:
        block.attn.causal = False
    idx = torch.randint(0, 40, (3, 12))
    perm = torch.randperm(12)
    with torch.no_grad():
        out, permuted = model.hidden(idx), model.hidden(idx[:, perm])
    assert torch.allclose(out[:, perm], permuted, atol=1e-5)
    rope = make(pos="rope")
    for block in rope.transformer.h:
        block.attn.causal = False
    with torch.no_grad():  # RoPE breaks the symmetry
        assert not torch.allclose(rope.hidden(idx)[:, perm], rope.hidden(idx[:, perm]), atol=1e-3)


def test_post_norm_block_output_has_unit_rms():
    cfg = GPTConfig(vocab_size=40, context=12, n_layer=4, d_model=16, n_head=2, ffn_mult=4, norm="post",
                    postln_frac=0.5)
    model = GPT(cfg)
    assert [b.post_norm for b in model.transformer.h] == [True, True, False, False]
    x = 5 * torch.randn(2, 12, 16)
    y = model.transformer.h[0](x)
    assert torch.allclose(y.square().mean(-1).sqrt(), torch.ones(2, 12), atol=1e-4)
    pre = Block(cfg, post_norm=False)(x)
    assert not torch.allclose(pre.square().mean(-1).sqrt(), torch.ones(2, 12), atol=1e-2)


@pytest.mark.parametrize("n_head", [1, 2, 4, 8])
def test_n_head_changes_attention_rank_not_parameter_count(n_head):
    base = sum(p.numel() for p in make(n_head=2).parameters())
    assert sum(p.numel() for p in make(n_head=n_head).parameters()) == base


def test_learned_positions_add_a_table_routed_to_the_scalar_optimizer():
    model = make(pos="learned")
    groups = route_parameters(model)
    assert "transformer.wpe.weight" in [n for n, _ in groups["embedding"]]
    assert model.transformer.wpe.weight.shape == (12, 16)
    for spec in (MUON, NORMUON, DION):
        matrix_opt, lion = build_optimizers(model, spec)
        assert any(p is model.transformer.wpe.weight for g in lion.param_groups for p in g["params"])
        assert not any(p is model.transformer.wpe.weight for g in matrix_opt.param_groups for p in g["params"])


def test_the_post_site_sees_the_configured_activation():
    """The post site is c_proj's input: gelu(c_fc(x)) for gelu, relu(c_fc(x))² for relu2, and the
    two differ on the same weights, so the choice reaches what is measured."""
    x = torch.randn(4, 16)
    seen = {}
    for name in ("relu2", "gelu"):
        mlp = make(activation=name).transformer.h[0].mlp
        hook = mlp.c_proj.register_forward_pre_hook(lambda m, inp, name=name: seen.__setitem__(name, inp[0]))
        mlp(x)
        hook.remove()
        h = mlp.c_fc(x)
        expect = torch.relu(h) ** 2 if name == "relu2" else 0.5 * h * (1 + torch.erf(h / 2**0.5))
        assert torch.allclose(seen[name], expect, atol=1e-6)
    assert not torch.allclose(seen["relu2"], seen["gelu"])


VARIANTS = [dict(pos="rope"), dict(pos="nope"), dict(pos="learned"), dict(norm="post"),
            dict(norm="post", postln_frac=0.5), dict(activation="gelu"), dict(n_head=4)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("spec", [ADAMW, MUON, NORMUON, DION], ids=["adamw", "muon", "normuon", "dion"])
def test_routing_covers_every_parameter_once_for_every_variant(variant, spec):
    model = make(**variant)
    ids = [id(p) for o in build_optimizers(model, spec) for g in o.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    _, loss = model(torch.randint(0, 40, (2, 12)), torch.randint(0, 40, (2, 12)))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("doc, message", [
    ({"model": {"d_model": 64, "n_head": 5}}, "model.n_head: d_model 64 is not divisible by n_head 5"),
    ({"model": {"d_model": 48, "n_head": 16}}, "model.n_head: head dim 3 is odd; RoPE needs an even head dim"),
    ({"model": {"norm": "post", "postln_frac": 1.5}}, "model.postln_frac: Input should be less than or equal to 1"),
    ({"model": {"postln_frac": 0.5}}, "model.postln_frac: postln_frac applies only with norm: post"),
    ({"model": {"pos": "alibi"}}, "model.pos: 'alibi' is not allowed"),
])
def test_impossible_architectures_are_spec_errors(tmp_path, doc, message):
    import yaml

    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_spec(path)


def test_odd_head_dim_is_fine_without_rope():
    RunSpec.model_validate({"model": {"d_model": 48, "n_head": 16, "pos": "nope"}})


def test_default_architecture_keeps_earlier_run_ids():
    # the factors were added later; at their defaults they must not change a run's id
    plain = RunSpec.model_validate({})
    explicit = RunSpec.model_validate({"model": {"pos": "rope", "norm": "pre", "activation": "relu2"}})
    assert plain.run_id == explicit.run_id
    assert RunSpec.model_validate({"model": {"pos": "nope"}}).run_id != plain.run_id
