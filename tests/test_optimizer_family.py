"""NorMuon, Dion and the optimizer specs (docs/design.md §2)."""

import math
from dataclasses import replace

import pytest
import torch

from spectraldb.spec import RunSpec, load_spec
from workers.optim import (Dion, Muon, NorMuon, build_optimizers, dion_rank, dion_update,
                           normuon_normalize, orthogonalize, route_parameters)
from tests.conftest import ADAMW, DION, MUON, NORMUON, tiny_model

# ---------------------------------------------------------------- NorMuon

def test_normuon_preserves_frobenius_norm():
    O = torch.randn(48, 16) * torch.linspace(0.1, 3, 48)[:, None]  # very uneven rows
    v = torch.zeros(48, 1)
    O_hat, factor = normuon_normalize(O, v, 0.95, 1e-8)
    assert O_hat.norm().item() == pytest.approx(O.norm().item(), rel=1e-6) and factor == 1.0
    row_norms = O_hat.norm(dim=1)
    assert row_norms.max() / row_norms.min() < 1.01  # rows equalised
    assert torch.allclose(v, 0.05 * O.square().mean(dim=1, keepdim=True))


def test_normuon_match_rms_gives_update_rms_0_2():
    O = torch.randn(32, 64)
    O_hat, factor = normuon_normalize(O, torch.zeros(32, 1), 0.95, 1e-8, "match_rms")
    rms = (factor * O_hat).square().mean().sqrt().item()
    assert rms == pytest.approx(0.2, rel=1e-5)


def test_normuon_equals_muon_when_rows_of_o_have_equal_norms():
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(32, 32))
    w0 = torch.randn(32, 32)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    muon = Muon([a], ns_dtype="fp32")
    normuon = NorMuon([b], ns_dtype="fp32")
    a.grad, b.grad = 3.0 * Q, 3.0 * Q  # orthogonal: O has equal row norms
    muon.step()
    normuon.step()
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- Dion

@pytest.mark.parametrize("f, r", [(1 / 2, 384), (1 / 4, 192), (1 / 8, 96), (1 / 16, 48)])
def test_dion_rank_table_for_d_model_768(f, r):
    for shape in ((768, 768), (3072, 768), (768, 3072), (768 * 8, 768)):
        assert dion_rank(*shape, f) == r


def dion_state(m, n, f, seed=0):
    r = dion_rank(m, n, f)
    g = torch.Generator().manual_seed(seed)
    return torch.zeros(m, n), torch.randn(min(m, n), r, generator=g), r


@pytest.mark.parametrize("shape, f", [((96, 64), 1 / 16), ((64, 96), 1 / 4), ((40, 40), 1 / 2)])
def test_dion_step_invariants(shape, f):
    M, Q, r = dion_state(*shape, f)
    assert Q.shape == (min(shape), r)
    for _ in range(3):
        delta, P, R = dion_update(torch.randn(shape), M, Q, 0.95)
        assert delta.shape == shape
        assert torch.allclose(P.T @ P, torch.eye(r), atol=1e-5)  # orthonormal P
        assert torch.allclose(Q.norm(dim=0), torch.ones(r), atol=1e-5)  # unit-norm Q columns
        assert delta.square().sum().item() == pytest.approx(r, rel=1e-4)  # ‖PQᵀ‖_F² = r


def test_full_rank_dion_is_heavy_ball_momentum():
    M, Q, _ = dion_state(24, 16, 1.0)
    M.copy_(torch.randn(24, 16))
    before = M.clone()
    G = torch.randn(24, 16)
    dion_update(G, M, Q, 0.9)
    assert torch.allclose(M, 0.9 * (before + G), atol=1e-5)


def test_full_rank_dion_with_constant_gradient_converges_to_polar_factor():
    G = torch.randn(20, 12)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    M, Q, _ = dion_state(20, 12, 1.0)
    for _ in range(60):
        delta, _, _ = dion_update(G, M, Q, 0.95)
    cos = (delta * (U @ Vh)).sum() / (delta.norm() * (U @ Vh).norm())
    assert cos.item() > 0.999


def test_dion_wide_path_equals_running_on_the_transpose():
    m, n = 32, 80  # m < n: Dion works on Mᵀ
    M1, Q1, _ = dion_state(m, n, 1 / 4)
    M2, Q2 = M1.T.clone(), Q1.clone()
    for _ in range(3):
        G = torch.randn(m, n)
        d1, _, _ = dion_update(G, M1, Q1, 0.95)
        d2, _, _ = dion_update(G.T.contiguous(), M2, Q2, 0.95)
        assert torch.allclose(d1, d2.T, atol=1e-5)
    assert torch.allclose(M1, M2.T, atol=1e-5)


def test_dion_zero_gradient_gives_no_nan():
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = Dion([p], rank_fraction=0.5)
    p.grad = torch.zeros(16, 8)
    opt.step()
    assert torch.isfinite(p).all()
    assert torch.isfinite(opt.state[p]["Q"]).all()


def test_dion_does_not_use_nesterov_or_rescale_by_rank():
    # the applied step's Frobenius norm is lr·√(m/n)·√r (no per-rank lr change)
    w0 = torch.randn(64, 16)
    p = torch.nn.Parameter(w0.clone())
    opt = Dion([p], lr=0.1, weight_decay=0.0, rank_fraction=0.25)
    p.grad = torch.randn(64, 16)
    opt.step()
    assert (p - w0).norm().item() == pytest.approx(0.1 * math.sqrt(64 / 16) * math.sqrt(4), rel=1e-4)


# ---------------------------------------------------------------- all optimizers

@pytest.mark.parametrize("spec", [ADAMW, MUON, NORMUON, DION, replace(DION, rank_fraction=1 / 16)],
                         ids=["adamw", "muon", "normuon", "dion-1/2", "dion-1/16"])
def test_every_optimizer_trains_the_tiny_model_with_full_routing(spec):
    model = tiny_model()
    opts = build_optimizers(model, spec)
    covered = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())
    seq = torch.randint(0, 8, (8, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("schedule", ["keller", "dion_quintic5", "polar_express5"])
def test_newton_schulz_schedules_orthogonalise(schedule):
    G = torch.randn(64, 32)
    X = orthogonalize(G, schedule, torch.float32)
    s = torch.linalg.svdvals(X)
    assert 0.6 < s.min() and s.max() < 1.25


def test_schedules_differ_as_documented_on_an_ill_conditioned_matrix():
    # singular values from 1e-3 to 1 (docs/design.md §2): keller overshoots and centres low,
    # dion_quintic5 and polar_express5 centre on 1
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(256, 256))
    V, _ = torch.linalg.qr(torch.randn(1024, 256))
    G = U @ torch.diag(torch.logspace(-3, 0, 256)) @ V.T
    sv = {s: torch.linalg.svdvals(orthogonalize(G, s, torch.float32))
          for s in ("keller", "dion_quintic5", "polar_express5")}
    assert sv["keller"].median() < 0.85 and sv["keller"].max() > 1.15
    for s in ("dion_quintic5", "polar_express5"):
        assert abs(sv[s].median().item() - 1) < 0.06 and sv[s].max() < 1.16


# ---------------------------------------------------------------- spec

def test_optimizer_defaults_are_the_studys():
    adamw = RunSpec.model_validate({"optimizer": "adamw"}).optimizer
    assert (adamw.lr, adamw.betas, adamw.weight_decay) == (3e-3, [0.9, 0.95], 0.01)
    for name in ("muon", "normuon"):
        o = RunSpec.model_validate({"optimizer": name}).optimizer
        assert (o.lr, o.momentum, o.nesterov, o.weight_decay, o.lr_scale, o.ns, o.lion_betas) == \
            (0.02, 0.95, True, 0.01, "spectral", "dion_quintic5", [0.95, 0.98])
    n = RunSpec.model_validate({"optimizer": "normuon"}).optimizer
    assert (n.beta2, n.eps, n.mode) == (0.95, 1e-8, "preserve_norm")
    d = RunSpec.model_validate({"optimizer": {"dion": {"rank_fraction": 0.0625}}}).optimizer
    assert (d.lr, d.mu, d.weight_decay, d.rank_fraction) == (0.02, 0.95, 0.01, 0.0625)
    assert RunSpec.model_validate({"optimizer": d.model_dump()}).label == "Dion (1/16)"


def test_sweep_variants_and_readable_labels(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("train: {steps: 200}\nsweep:\n  optimizer:\n    - adamw\n    - {name: adamw, lr: 1e-4}\n"
                    "    - dion: {rank_fraction: [0.5, 0.25, 0.125, 0.0625]}\n")
    labels = [r.label for r in load_spec(spec)[0].runs]
    assert labels == ["AdamW (lr=0.003)", "AdamW (lr=0.0001)", "Dion (1/2)", "Dion (1/4)", "Dion (1/8)", "Dion (1/16)"]


def test_rank_fraction_out_of_range_is_a_spec_error(tmp_path):
    from spectraldb.errors import SpecError

    spec = tmp_path / "s.yaml"
    spec.write_text("sweep:\n  optimizer:\n    - dion: {rank_fraction: [0.5, 1.5]}\n")
    with pytest.raises(SpecError, match=r"s.yaml:3 sweep.optimizer\[0\].rank_fraction: Input should be less than or equal to 1"):
        load_spec(spec)


def test_routing_sends_only_block_matrices_to_matrix_optimizers():
    model = tiny_model()
    for spec in (MUON, NORMUON, DION):
        matrix_opt = build_optimizers(model, spec)[0]
        routed = {id(p) for g in matrix_opt.param_groups for p in g["params"]}
        assert routed == {id(p) for _, p in route_parameters(model)["matrix"]}
