"""Queries on a synthetic store written through the store API, with planted power laws."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb import store
from spectraldb.spec import RunSpec
from tests.builders import evaluations, result, spectrum
from tests.conftest import flat

runner = CliRunner()


def write(db, optimizer, mult, ranks, status="done", d_model=16, steps=300, last_k=2):
    """ranks: {(step, layer): (pre_rank, post_rank) or post_rank}."""
    run = RunSpec.model_validate({"model": {"d_model": d_model, "ffn_mult": mult}, "optimizer": optimizer,
                                  "train": {"steps": steps}, "measure": {"every": 100, "last_k": last_k}})
    D = run.model.ffn_width
    spectra = []
    for (step, layer), r in ranks.items():
        pre, post = r if isinstance(r, tuple) else (r, r)
        for site, rank in (("pre", pre), ("post", post)):
            spectra.append(spectrum(step, layer, site, "all", flat(rank, D), 10 * D))
    store.write_run(db, run, result(status, spectra, evaluations(sorted({s for s, _ in ranks}), 4.0, 4.0, 54.6)), {})
    return run


MULTS = (1, 4, 16, 64)  # D = 16 … 1024


@pytest.fixture
def planted(tmp_path):
    """AdamW: β = 1 at step 100 and 0.5 at steps 200/300, in both layers.
    Muon: layer 0 has β = 1, layer 1 has β = 0.5, at every step."""
    db = tmp_path / "q.duckdb"
    for m in MULTS:
        D = 16 * m
        write(db, "adamw", m, {(s, l): (D // 4 if s == 100 else 2 * int(np.sqrt(D))) for s in (100, 200, 300) for l in (0, 1)})
        write(db, "muon", m, {(s, l): (D // 4 if l == 0 else 2 * int(np.sqrt(D))) for s in (100, 200, 300) for l in (0, 1)})
    write(db, "adamw", 2, {(100, 0): 3, (100, 1): 3}, status="diverged")  # would spoil AdamW's fit
    return db


def rows(db, *args):
    result = runner.invoke(app, ["query", *args, "--db", str(db), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_dynamics_returns_planted_exponent_at_each_step(planted):
    out, err = rows(planted, "dynamics")
    by = {(r["optimizer"], r["step"]): r for r in out}
    assert by[("AdamW", 100)]["beta_hard"] == pytest.approx(1.0)
    assert by[("AdamW", 200)]["beta_hard"] == pytest.approx(0.5)
    assert by[("AdamW", 300)]["beta_soft"] == pytest.approx(0.5, abs=1e-6)
    assert by[("AdamW", 300)]["n_widths"] == 4
    assert "excluded 1 diverged run" in err


def test_depth_returns_planted_exponent_per_layer(planted):
    out, _ = rows(planted, "depth")
    by = {(r["optimizer"], r["layer"]): r for r in out}
    assert by[("Muon", 0)]["beta_hard"] == pytest.approx(1.0)
    assert by[("Muon", 1)]["beta_hard"] == pytest.approx(0.5)
    assert by[("AdamW", 0)]["beta_hard"] == pytest.approx(0.5)  # last_k = 2: steps 200, 300


def test_beta_excludes_diverged_runs_unless_asked(planted):
    out, err = rows(planted, "beta")
    adamw = [r for r in out if r["optimizer"] == "AdamW"][0]
    assert adamw["beta_hard"] == pytest.approx(0.5) and adamw["n_widths"] == 4
    assert "excluded 1 diverged run (--include-diverged to keep them)" in err
    out, err = rows(planted, "beta", "--include-diverged")
    adamw = [r for r in out if r["optimizer"] == "AdamW"][0]
    assert adamw["n_widths"] == 5 and adamw["beta_hard"] != pytest.approx(0.5)
    assert "excluded" not in err


def test_renyi_reports_ranks_and_reinjection_ratios(tmp_path):
    db = tmp_path / "r.duckdb"
    write(db, "adamw", 4, {(100, 0): (8, 32), (100, 1): (16, 32), (300, 0): (4, 16), (300, 1): (8, 32)})
    out, _ = rows(db, "renyi", "--ffn-mult", "4")
    assert len(out) == 7  # one row per α
    for r in out:  # flat spectra: every R_α is the rank; final step 300: pre 4|8, post 16|32
        # (the 1e-12 eigenvalue floor adds ~1e-4 at α = 0.5)
        assert r["pre"] == pytest.approx(6.0, rel=1e-3) and r["post"] == pytest.approx(24.0, rel=1e-3)
        assert r["rho"] == pytest.approx(4.0, rel=1e-3) and r["rho_min"] == pytest.approx(4.0, rel=1e-3)
        assert r["n_layers"] == 2 and 0 < r["js_divergence"] < np.log(2)
    out, _ = rows(db, "renyi", "--ffn-mult", "4", "--step", "100")
    assert out[0]["rho_min"] == pytest.approx(2.0, rel=1e-3) and out[0]["rho_max"] == pytest.approx(4.0, rel=1e-3)


def test_keep_last_k_eigenvalues_keeps_every_rank(tmp_path):
    db = tmp_path / "k.duckdb"
    run = RunSpec.model_validate({"train": {"steps": 300}, "measure": {"every": 100, "last_k": 2,
                                                                       "keep_eigenvalues": "last_k"}})
    spectra = [spectrum(s, 0, "post", "all", flat(10, 256), 5000) for s in (1, 100, 200, 300)]
    store.write_run(db, run, result("done", spectra), {})
    with store.connect(db, read_only=True) as con:
        kept = con.execute("SELECT step, eigenvalues IS NOT NULL, skipped FROM spectra ORDER BY step").fetchall()
        n_ranks = con.execute("SELECT count(*) FROM ranks").fetchone()[0]
    assert kept == [(1, False, False), (100, False, False), (200, True, False), (300, True, False)]
    assert n_ranks == 4


@pytest.mark.parametrize("live_code_changed", [False, True])
def test_migration_002_backfills_metrics_of_older_runs(tmp_path, monkeypatch, live_code_changed):
    """…with its own frozen code: a later change to spectraldb.spectra does not change what an
    old migration computes."""
    import duckdb

    from contract import metrics as spectra

    if live_code_changed:
        for name in ("renyi_rank", "hard_rank", "soft_rank", "eee", "js_divergence"):
            monkeypatch.setattr(spectra, name, lambda *a, **k: -1.0)

    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))  # a store as version 1 of specdb left it
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
    number, name, sql = store.migrations()[0]
    con.execute(sql)
    con.execute("INSERT INTO schema_version VALUES (1, ?, now())", [name])
    con.execute("INSERT INTO runs (run_id, optimizer, optimizer_name, ffn_mult, ffn_width, d_model, n_layer, n_head, "
                "context, seed, steps, batch_size, last_k, status, config) VALUES "
                "('r1', 'AdamW', 'adamw', 1, 64, 64, 1, 4, 64, 0, 10, 8, 1, 'done', '{}')")
    for site, rank in (("pre", 8), ("post", 16)):
        con.execute("INSERT INTO spectra VALUES ('r1', 10, 0, ?, 'all', 640, 64, false, 0, ?)", [site, list(flat(rank, 64))])
        con.execute("INSERT INTO ranks VALUES ('r1', 10, 0, ?, 'all', 640, ?, ?, 0)", [site, rank, rank])
    con.close()
    store.migrate(db)
    with store.connect(db, read_only=True) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == store.SCHEMA_VERSION
        assert con.execute("SELECT renyi_inf FROM ranks WHERE site = 'post'").fetchone()[0] == pytest.approx(16)
        assert con.execute("SELECT rho_2 FROM reinjection").fetchone()[0] == pytest.approx(2.0)
        assert con.execute("SELECT pos FROM runs").fetchone()[0] == "rope"
