"""`measure.metrics: hard_only` (issue 27): the hard rank from tr(C)²/‖C‖_F², no eigendecomposition."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import rows, tiny_model, tiny_spec
from workers import measurement

runner = CliRunner()


def test_hard_only_records_carry_the_hard_rank_of_the_full_path_and_no_eigenvalues(monkeypatch):
    model = tiny_model(ffn_mult=2)
    tokens = torch.randint(0, 64, (20, 16), generator=torch.Generator().manual_seed(0))
    strata = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    kw = dict(sites=("pre", "post"), strata=("all", "head", "mid", "tail"), min_tokens=20)
    full = measurement.measure(model, tokens, strata, **kw)
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda *a, **k: pytest.fail("hard_only decomposed a matrix"))
    hard = measurement.measure(model, tokens, strata, which="hard_only", **kw)
    assert [r.key for r in hard] == [r.key for r in full]
    for a, b in zip(full, hard):
        assert b.eigenvalues is None and b.reinjection is None
        if a.eigenvalues is None:
            assert b.metrics is None and b.is_skipped  # under the token floor either way
        else:
            assert set(b.metrics) == {"hard_rank"} and b.computed
            assert b.metrics["hard_rank"] == pytest.approx(a.metrics["hard_rank"], rel=1e-9)


@pytest.mark.slow
def test_a_hard_only_run_stores_hard_ranks_and_fits_beta_hard_alone(tmp_path, corpus):
    stores = {}
    for which in ("full", "hard_only"):
        db, spec = tmp_path / f"{which}.duckdb", tmp_path / f"{which}.yaml"
        spec.write_text(tiny_spec(corpus, db, "sweep:\n  ffn_mult: [1, 2, 4]\n")
                        .replace("every: 3", f"every: 3, metrics: {which}"))
        out = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
        assert out.exit_code == 0, out.output
        stores[which] = db
    ranks = """SELECT k.step, k.layer, k.site, k.stratum, k.hard_rank, k.soft_rank, r.ffn_width
               FROM ranks k JOIN runs r USING (run_id) ORDER BY r.ffn_width, k.step, k.layer, k.site, k.stratum"""
    full, hard = rows(stores["full"], ranks), rows(stores["hard_only"], ranks)
    assert [r[:4] for r in full] == [r[:4] for r in hard] and len(hard) > 0
    np.testing.assert_allclose([r[4] for r in hard], [r[4] for r in full], rtol=1e-9)
    assert {r[5] for r in hard} == {None}
    spectra = rows(stores["hard_only"],
                   "SELECT bool_or(eigenvalues IS NOT NULL), count(*) FILTER (NOT skipped) FROM spectra")
    assert spectra[0][0] is False and spectra[0][1] == len(hard)
    assert rows(stores["hard_only"], "SELECT count(*) FROM reinjection") == [(0,)]
    ids = "SELECT run_id FROM runs ORDER BY 1"
    assert rows(stores["full"], ids) != rows(stores["hard_only"], ids)  # hard_only is another run
    betas = {}
    for which, db in stores.items():
        out = runner.invoke(app, ["query", "beta", "--db", str(db), "--stratum", "all", "--format", "json"])
        assert out.exit_code == 0, out.output
        betas[which], = json.loads(out.stdout)
    assert betas["hard_only"]["beta_hard"] == pytest.approx(betas["full"]["beta_hard"], rel=1e-7)
    assert betas["full"]["beta_soft"] is not None and betas["hard_only"]["beta_soft"] is None
    page = tmp_path / "report.html"  # the report says what hard_only cannot show, never fails on it
    out = runner.invoke(app, ["report", "-o", str(page), "--db", str(stores["hard_only"])])
    assert out.exit_code == 0, out.output
    assert "no Rényi ranks at ffn_mult 4: measure with" in page.read_text(encoding="utf-8")
    for verb in ("trajectories", "depth", "dynamics", "matched"):  # every question answers, soft left empty
        out = runner.invoke(app, ["query", verb, "--db", str(stores["hard_only"]), "--format", "json"])
        assert out.exit_code == 0 and (verb == "matched" or json.loads(out.stdout)), (verb, out.output)
    out = runner.invoke(app, ["plot", "renyi", "--ffn-mult", "4", "-o", str(tmp_path / "r.png"),
                              "--db", str(stores["hard_only"])])
    assert out.exit_code == 2 and out.stderr == ("plot renyi: nothing to draw: the runs at ffn_mult 4 hold no Rényi "
                                                 "ranks (a run measured with `measure.metrics: hard_only` stores the "
                                                 "hard rank alone)\n")
    for kind in ("scaling", "trajectories"):  # the soft panel says why it is empty
        assert runner.invoke(app, ["plot", kind, "-o", str(tmp_path / f"{kind}.png"),
                                   "--db", str(stores["hard_only"])]).exit_code == 0
