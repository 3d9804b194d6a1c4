import math

import pytest
import torch

from contract import sizes
from tests.conftest import ADAMW, MUON, tiny_model
from workers.optim import Lion, Muon, build_optimizers, lion_update, lr_multiplier, lr_scale, route_parameters

def test_routing_covers_every_parameter_once_by_name():
    model = tiny_model()
    groups = route_parameters(model)
    names = [n for ps in groups.values() for n, _ in ps]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert [n for n, _ in groups["embedding"]] == ["transformer.wte.weight"]
    assert [n for n, _ in groups["head"]] == ["lm_head.weight"]
    assert all(n.startswith("transformer.h.") for n, _ in groups["matrix"])
    assert len(groups["matrix"]) == 2 * 6  # q, k, v, o, c_fc, c_proj per block
    for spec in (ADAMW, MUON):
        opt_params = [id(p) for o in build_optimizers(model, spec) for g in o.param_groups for p in g["params"]]
        assert sorted(opt_params) == sorted(id(p) for p in model.parameters())


def test_muon_routes_matrices_to_muon_and_tables_to_lion_with_scaled_head_lr():
    model = tiny_model()
    muon, lion = build_optimizers(model, MUON)
    assert isinstance(muon, Muon) and isinstance(lion, Lion)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    head_group = [g for g in lion.param_groups if any(p is model.lm_head.weight for p in g["params"])][0]
    assert head_group["lr"] == pytest.approx(0.02 / math.sqrt(16))


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 48)])
def test_muon_keller_mode_matches_torch_muon_bitwise(shape):
    torch.manual_seed(1)
    w0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(5)]
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = Muon([a], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01, lr_scale="keller",
                ns="keller", ns_dtype="bf16")
    ref = torch.optim.Muon([b], lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, b)


def test_spectral_scale_gives_c_proj_one_over_sqrt_k():
    d, k = 64, 4
    assert lr_scale(torch.Size((d, k * d)), "spectral") == pytest.approx(1 / math.sqrt(k))  # mlp.c_proj
    assert lr_scale(torch.Size((k * d, d)), "spectral") == pytest.approx(math.sqrt(k))  # c_fc
    assert lr_scale(torch.Size((d, k * d)), "keller") == 1.0


def test_lion_update_matches_its_definition():
    g, m = torch.tensor([0.5, -2.0, 0.1]), torch.tensor([-1.0, 1.0, 0.3])
    expected_u = torch.sign(0.95 * m + 0.05 * g)
    expected_m = 0.98 * m + 0.02 * g
    u = lion_update(g, m, 0.95, 0.98)
    assert torch.equal(u, expected_u)
    assert torch.allclose(m, expected_m)


def test_lr_schedule_is_the_studys():
    """The study: it = step − 1; lr = 1 while it < total − cooldown, else (total − it)/cooldown."""
    def study(it, total=100, cooldown=20):
        return 1.0 if it < total - cooldown else (total - it) / cooldown

    mult = [lr_multiplier(s, 100, 0, 0.2) for s in range(1, 101)]
    assert mult == [study(s - 1) for s in range(1, 101)]
    assert mult[:80] == [1.0] * 80 and mult[80] == 1.0 and mult[81] == pytest.approx(0.95)
    assert mult[-1] == pytest.approx(0.05)  # the last update still moves (protocol 1 ended at 0)
    assert all(a >= b for a, b in zip(mult, mult[1:]))
    assert [lr_multiplier(s, 10, 0, 0.0) for s in range(1, 11)] == [1.0] * 10


def test_init_variance_and_forward_shapes():
    model = tiny_model(ffn_mult=4)
    w = model.transformer.h[0].mlp.c_proj.weight  # (d, D): variance 1/D · min(1, d/D)
    assert w.var().item() == pytest.approx((1 / 64) * (16 / 64), rel=0.2)
    logits, loss = model(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long))
    assert logits.shape == (2, 16, 64) and loss.ndim == 0
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))


# the worker's side of the contract (torch): kept out of the unit tier, which never imports torch

def test_the_derived_sizes_have_one_definition_everywhere():
    from spectraldb.spec.models import ModelSpec
    from workers.model import GPTConfig

    for mult, d, norm, frac, layers in ((4.0, 64, "pre", None, 2), (2.7, 96, "post", 0.5, 5), (1 / 3, 48, "post", None, 3)):
        spec = ModelSpec(d_model=d, ffn_mult=mult, norm=norm, postln_frac=frac, n_layer=layers, n_head=4)
        model = GPTConfig(vocab_size=10, context=8, n_layer=layers, d_model=d, n_head=4, ffn_mult=mult, norm=norm,
                          postln_frac=frac)
        assert spec.ffn_width == model.ffn_width == sizes.ffn_width(mult, d) == int(round(mult * d))
        assert spec.n_post_norm == model.n_post_norm == sizes.n_post_norm(norm, layers, frac)
    assert sizes.n_post_norm("post", 5, 0.5) == 2 and sizes.n_post_norm("pre", 5, 1.0) == 0


def test_the_model_of_a_run_comes_from_its_spec_alone():
    """Run defaults exist once: the spec fills every field of the worker's typed record; the model
    reads them, with no fallback."""
    from spectraldb.spec import RunSpec
    from workers.model import GPTConfig

    config = RunSpec.model_validate({}).worker_config()
    cfg = GPTConfig.from_run(config, vocab_size=300)
    assert (cfg.n_layer, cfg.d_model, cfg.pos, cfg.norm, cfg.activation) == (2, 64, "rope", "pre", "relu2")
    with pytest.raises(AttributeError):
        config.model.activation = "gelu"  # frozen: a worker cannot change what the spec resolved
