"""Queries on a synthetic store written through the store API, with planted power laws."""

import json

import duckdb

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb import store
from spectraldb.spec import RunSpec
from tests.builders import evaluations, result, spectrum
from tests.conftest import flat, planting, put
from tests.unit.test_store import fake_result

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


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """AdamW: β = 1 at step 100 and 0.5 at steps 200/300, in both layers.
    Muon: layer 0 has β = 1, layer 1 has β = 0.5, at every step. (Read only by its tests.)"""
    db = tmp_path_factory.mktemp("queries") / "q.duckdb"
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
    assert rows(db, "renyi", "--ffn-mult", "4", "--where", "steps = 300")[0] == rows(db, "renyi", "--ffn-mult", "4")[0]
    assert rows(db, "renyi", "--ffn-mult", "4", "--where", "steps = 7")[0] == []  # the predicate selects the runs


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
    """…with its own frozen code: a later change to contract.metrics does not change what an
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


# ---------------------------------------------------------------- β, matched and delta through the CLI

from tests.conftest import MULTS as FACTOR_MULTS  # noqa: E402 - d_model 32 → D = 32 … 256
from tests.conftest import by_key, query  # noqa: E402



def test_beta_by_factors_metric_window_step_and_where(planted_factors):
    rows, _ = query(planted_factors, "beta", "--by", "optimizer,n_head")
    b = by_key(rows, "optimizer", "n_head")
    assert b[("AdamW", 4)]["beta_hard"] == pytest.approx(1.0, abs=1e-3)
    assert b[("Muon", 4)]["beta_hard"] == pytest.approx(0.5, abs=2e-3)
    assert b[("Muon", 8)]["beta_hard"] == pytest.approx(0.6, abs=2e-3)
    rows, _ = query(planted_factors, "beta", "--metric", "renyi:inf", "--where", "n_head = 4")
    assert by_key(rows, "optimizer")["AdamW"]["beta"] == pytest.approx(1.0, abs=1e-6)  # flat: R_∞ = ⌊rank⌋
    assert {r["metric"] for r in rows} == {"renyi:inf"}
    rows, _ = query(planted_factors, "beta", "--step", "100", "--where", "n_head = 4")
    assert by_key(rows, "optimizer")["Muon"]["beta_hard"] == pytest.approx(1.0, abs=1e-3)
    rows, _ = query(planted_factors, "beta", "--window", "3", "--where", "n_head = 4")  # median of 3 steps: 2√D
    assert by_key(rows, "optimizer")["Muon"]["beta_hard"] == pytest.approx(0.5, abs=2e-3)
    rows, _ = query(planted_factors, "beta", "--layer", "each", "--where", "n_head = 4")
    assert {(r["optimizer"], r["layer"]) for r in rows} == {("AdamW", 0), ("AdamW", 1), ("Muon", 0), ("Muon", 1)}


def test_seed_bootstrap_interval_covers_the_planted_beta(tmp_path):
    db = tmp_path / "s.duckdb"
    rng = np.random.default_rng(0)
    for m in FACTOR_MULTS:  # seed noise, independent per width; the planted exponent is 0.7
        with planting(db) as plant:
            for seed in range(6):
                noise = float(np.exp(rng.normal(0, 0.03)))
                plant(mult=m, seed=seed, rank_of=lambda D, s, l, e=noise: 0.2 * D**0.7 * e, layers=1)
    rows, _ = query(db, "beta")
    r = rows[0]
    assert r["n_seeds"] == 6
    assert r["beta_hard_boot_low"] < 0.7 < r["beta_hard_boot_high"]
    assert r["beta_hard_boot_high"] - r["beta_hard_boot_low"] < 0.3


def test_fits_need_three_widths(tmp_path):
    db = tmp_path / "w.duckdb"
    with planting(db) as plant:
        for m in (1, 2):
            plant(mult=m, rank_of=lambda D, s, l: D / 4)
    for m in (1, 2, 4):
        put(db, optimizer="muon", mult=m, rank_of=lambda D, s, l: D / 4)
    rows, err = query(db, "beta")
    b = by_key(rows, "optimizer")
    assert b["AdamW"]["beta_hard"] is None and b["Muon"]["beta_hard"] == pytest.approx(1, abs=1e-3)
    assert "AdamW: 2 widths; a fit needs at least 3 (refused)" in err
    assert "Muon: fit on only 3 widths" in err


def test_matched_finds_the_planted_pair(tmp_path):
    db = tmp_path / "m.duckdb"
    with planting(db) as plant:
        for m in FACTOR_MULTS:
            plant(optimizer="adamw", steps=300, mult=m, ppl=50.0, rank_of=lambda D, s, l: D / 4)
            plant(optimizer={"name": "dion", "rank_fraction": 0.0625}, steps=300, mult=m, ppl=50.0 * 1.02,
                rank_of=lambda D, s, l: 2 * np.sqrt(D))
            plant(optimizer="adamw", steps=600, mult=m, ppl=40.0, rank_of=lambda D, s, l: 2 * np.sqrt(D))
    rows, err = query(db, "matched", "--ppl-tol", "0.03", "--min-dbeta", "0.2")
    assert len(rows) == 1
    r = rows[0]
    assert {r["group_a"], r["group_b"]} == {"AdamW / 300", "Dion (1/16) / 300"}
    assert abs(r["dbeta"]) == pytest.approx(0.5, abs=5e-3)
    assert r["ppl_gap"] == pytest.approx(0.02 / 1.01, rel=1e-3) and r["matched_by_width"] is True
    assert len(r["width_gaps"].split()) == 4
    assert "1 matched pair" in err
    rows, _ = query(db, "matched", "--ppl-tol", "0.01")
    assert rows == []


def test_delta_counts_k_of_n(tmp_path):
    db = tmp_path / "d.duckdb"
    betas = {"adamw": (0.5, 0.55), "muon": (0.8, 0.7), "normuon": (0.6, 0.2)}  # (n_head 4, n_head 8)
    with planting(db) as plant:
        for name, (b4, b8) in betas.items():
            for m in FACTOR_MULTS:
                plant(optimizer=name, mult=m, n_head=4, rank_of=lambda D, s, l, b=b4: D**b)
                plant(optimizer=name, mult=m, n_head=8, rank_of=lambda D, s, l, b=b8: D**b)
    rows, err = query(db, "delta", "--arch", "n_head", "--baseline", "adamw", "--reference", "4")
    assert len(rows) == 6  # 3 optimizers × hard/soft, stratum all only
    hard = by_key([r for r in rows if r["metric"] == "hard"], "optimizer")
    assert hard["AdamW"]["arch_shift"] == pytest.approx(0.05, abs=5e-3)
    assert hard["Muon"]["optimizer_gain"] == pytest.approx(0.3, abs=5e-3)
    assert [hard[o]["passes"] for o in ("AdamW", "Muon", "NorMuon")] == [True, True, False]
    assert "4 of 6 comparisons" in err


def test_betas_view_matches_query_beta_value_by_value(tmp_path):
    """Two n_head and two steps values: the view fits each configuration apart (it used to pool
    them by optimizer) and applies the 3-width floor, exactly as `query beta --by …` does."""
    db = tmp_path / "b.duckdb"
    with planting(db) as plant:
        for n_head, steps, slope in ((4, 300, 1.0), (8, 300, 0.5), (4, 600, 0.75)):
            for mult in (1, 2, 4, 8):
                plant(mult=mult, n_head=n_head, steps=steps, rank_of=lambda D, s, l, b=slope: 0.5 * D**b)
        plant(optimizer="muon", mult=1, rank_of=lambda D, s, l: D / 4)  # 2 widths: no fit anywhere
        plant(optimizer="muon", mult=2, rank_of=lambda D, s, l: D / 4)
    rows, _ = query(db, "beta", "--by", "optimizer,n_head,steps")
    fits = {(r["optimizer"], r["n_head"], r["steps"]): r for r in rows if r["beta_hard"] is not None}
    con = duckdb.connect(str(db), read_only=True)
    view = con.execute("""SELECT optimizer, n_head, steps, metric, beta, r2, n_widths FROM betas
                          WHERE site = 'post' AND stratum = 'all' AND metric IN ('hard', 'soft')""").fetchall()
    con.close()
    assert len(view) == 2 * len(fits) == 6
    for opt, n_head, steps, metric, beta, r2, n_widths in view:
        row = fits[(opt, n_head, steps)]
        assert beta == pytest.approx(row[f"beta_{metric}"], abs=1e-9)
        assert r2 == pytest.approx(row[f"r2_{metric}"], abs=1e-9) and n_widths == row["n_widths"] == 4
    assert {k: round(v["beta_hard"], 6) for k, v in fits.items()} == {
        ("AdamW", 4, 300): 1.0, ("AdamW", 8, 300): 0.5, ("AdamW", 4, 600): 0.75}


def test_query_beta_recovers_planted_exponents(tmp_path):
    db = tmp_path / "s.duckdb"
    for name, rank_of in (("adamw", lambda D: D // 4), ("muon", lambda D: 2 * int(np.sqrt(D)))):
        for mult in (1, 4, 16, 64):
            run = RunSpec.model_validate({"model": {"d_model": 16, "ffn_mult": mult}, "optimizer": name,
                                          "train": {"steps": 200}})
            D = run.model.ffn_width
            store.write_run(db, run, fake_result({(100, 0): rank_of(D), (200, 0): rank_of(D)}, D), {})
    result = runner.invoke(app, ["query", "beta", "--db", str(db), "--format", "json"])
    assert result.exit_code == 0, result.output
    import json

    rows = {r["optimizer"]: r for r in json.loads(result.stdout)}
    assert rows["AdamW"]["beta_hard"] == pytest.approx(1.0) and rows["AdamW"]["beta_soft"] == pytest.approx(1.0, abs=1e-6)
    assert rows["Muon"]["beta_hard"] == pytest.approx(0.5) and rows["Muon"]["n_widths"] == 4
    assert rows["Muon"]["delta_12"] == pytest.approx(0.0, abs=1e-6)
    assert set(rows["Muon"]) == {"optimizer", "beta_hard", "beta_hard_low", "beta_hard_high", "r2_hard",
                                 "beta_soft", "beta_soft_low", "beta_soft_high", "r2_soft", "delta_12", "n_widths",
                                 "min_n_over_d"}


