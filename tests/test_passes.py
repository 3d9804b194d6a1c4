"""Measurement in passes (issue 27): a budget the accumulators exceed measures the same tokens
once per group of layers × sites and stores the eigenvalues of one pass, bitwise."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from contract import memory as mem
from tests.conftest import rows, tiny_model, tiny_spec
from workers import extract, measurement
from workers.probe import ProbeError, attach

STRATA = ("all", "head", "mid", "tail")
KW = dict(sites=("pre", "post"), strata=STRATA, min_tokens=20, chunk=7)
runner = CliRunner()


def same(one, many):
    assert [r.key for r in one] == [r.key for r in many]
    for a, b in zip(one, many):
        assert (a.eigenvalues is None) == (b.eigenvalues is None), a.key
        if a.eigenvalues is not None:
            assert np.array_equal(a.eigenvalues, b.eigenvalues), a.key
            assert a.min_eigenvalue == b.min_eigenvalue and a.metrics == b.metrics and a.reinjection == b.reinjection


@pytest.mark.parametrize("units_per_pass", [1, 3])
def test_passes_give_the_spectra_of_one_pass_bitwise(units_per_pass, monkeypatch):
    model = tiny_model(n_layer=3, ffn_mult=2)
    tokens = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(0))
    strata = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    folds = []
    fold = extract.StreamingCovariance._update_owned
    monkeypatch.setattr(extract.StreamingCovariance, "_update_owned", lambda self, x: folds.append(1) or fold(self, x))
    one = measurement.measure(model, tokens, strata, **KW)
    in_one = len(folds)
    budget = mem.pass_bytes([32] * units_per_pass, STRATA)
    many = measurement.measure(model, tokens, strata, memory=budget, **KW)
    same(one, many)
    assert sum(r.reinjection is not None for r in many) == 3 * 4  # pre and post paired across passes
    # passes repeat the forwards, never a fold: each accumulator sees each chunk once
    assert len(folds) - in_one == in_one


def test_the_probe_api_runs_every_part_and_refuses_a_short_cut():
    model = tiny_model(n_layer=2, ffn_mult=2).double()
    ids = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(2))
    whole = attach(model, strata=("all",), min_tokens=2)
    with torch.no_grad(), whole.measuring(ids):
        model.hidden(ids)
    want = whole.compute(step=3)
    probe = attach(model, strata=("all",), min_tokens=2, memory=mem.pass_bytes([32], ("all",)))
    assert list(probe.parts) == [0, 1, 2, 3]
    with pytest.raises(ProbeError, match=r"measure in 4 passes .*part=part"):
        with probe.measuring(ids):
            pass
    for part in probe.parts[:2]:
        with torch.no_grad(), probe.measuring(ids, part=part):
            model.hidden(ids)
    with pytest.raises(ProbeError, match="measured 2 of 4"):
        probe.compute()
    probe = attach(model, strata=("all",), min_tokens=2, memory=mem.pass_bytes([32], ("all",)))
    for part in probe.parts:
        for half in (ids[:3], ids[3:]):  # micro-batches within a pass
            with torch.no_grad(), probe.measuring(half, part=part):
                model.hidden(half)
    got = probe.compute(step=3)
    assert [r.key for r in got] == [r.key for r in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10, atol=1e-14)  # merged micro-batches
    with pytest.raises(ProbeError, match="not one of this probe's 4 passes"):
        with probe.measuring(ids, part=4):
            pass


def test_a_budget_one_layer_exceeds_is_refused_by_the_probe():
    with pytest.raises(ProbeError, match=r"width 64 needs .* over the budget of 1\.0 KiB"):
        attach(tiny_model(), memory=1024)


def test_only_the_parts_a_stratum_needs_are_held():
    model = tiny_model(ffn_mult=2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    probe = attach(model, token_strata=np.arange(64) % 3, strata=("tail",), min_tokens=2)
    with torch.no_grad(), probe.measuring(ids):
        model.hidden(ids)
    assert sorted({key[2] for key in probe.acc}) == [2]  # tail alone: one accumulator per layer × site
    assert {r.stratum for r in probe.compute()} == {"tail"}


@pytest.mark.slow
def test_a_run_in_passes_stores_the_eigenvalues_of_one_pass_bitwise(tmp_path, corpus):
    """D 1024, strata all and tail: 4 layer × sites of 72 MiB each at their peak (288 MiB in one
    pass); a 200 MiB budget measures them in 2 passes."""
    stores = {}
    for budget in ("200MiB", "8GiB"):
        db, spec = tmp_path / f"{budget}.duckdb", tmp_path / f"{budget}.yaml"
        spec.write_text(tiny_spec(corpus, db, steps=2).replace("ffn_mult: 1", "ffn_mult: 64")
                        .replace("every: 3", f"every: 2, strata: [all, tail], memory: {budget}"))
        plan = runner.invoke(app, ["plan", str(spec), "--format", "json"])
        assert plan.exit_code == 0, plan.output
        row, = json.loads(plan.stdout)
        assert row["ffn_width"] == 1024 and row["passes"] == (2 if budget == "200MiB" else 1)
        assert row["measure_gib"] <= (200 / 1024 if budget == "200MiB" else 8)
        done = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
        assert done.exit_code == 0, done.output
        stores[budget] = db
    sql = """SELECT step, layer, site, stratum, n_tokens, eigenvalues FROM spectra ORDER BY ALL"""
    small, large = rows(stores["200MiB"], sql), rows(stores["8GiB"], sql)
    assert len(small) == 2 * 2 * 2 * 2 and small == large  # exact equality of every stored eigenvalue
    ranks = "SELECT * EXCLUDE (run_id) FROM ranks ORDER BY ALL"
    assert rows(stores["200MiB"], ranks) == rows(stores["8GiB"], ranks)
    # the run id does not depend on the budget: the same run
    assert rows(stores["200MiB"], "SELECT run_id FROM runs") == rows(stores["8GiB"], "SELECT run_id FROM runs")


def test_plan_and_run_refuse_a_budget_one_layer_exceeds_and_write_nothing(tmp_path, corpus):
    db, spec = tmp_path / "r.duckdb", tmp_path / "r.yaml"
    spec.write_text(tiny_spec(corpus, db).replace("every: 3", "every: 3, memory: 8KiB"))
    for command in ("plan", "run"):
        out = runner.invoke(app, [command, str(spec), "--executor", "inline"])
        assert out.exit_code == 2, out.output
        line, = out.stderr.strip().splitlines()
        assert line.startswith("measure.memory: one layer × site of width 16 needs") and "over the budget of 8.0 KiB" in line
        assert not db.exists()
