"""The scientific verbs on synthetic stores with planted power laws: the answers are known."""

import hashlib
import json

import duckdb
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import put
from spectraldb import plots, store
from spectraldb.selection import Selection

runner = CliRunner()
MULTS = (1, 2, 4, 8)  # d_model 32 → D = 32 … 256


def query(db, *args, code=0):
    result = runner.invoke(app, ["query", *args, "--db", str(db), "--format", "json"])
    assert result.exit_code == code, result.output
    return (json.loads(result.stdout) if code == 0 else None), result.stderr


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """AdamW: hard rank = D/4 (β = 1); Muon: 2·√D (β = 0.5) at steps 200/300 but D/4 at step 100,
    and in layer 1 only D/8 (β = 1 still); both with n_head 4 and 8 (Muon β 0.6 at 8 heads)."""
    db = tmp_path_factory.mktemp("planted") / "v.duckdb"
    for m in MULTS:
        put(db, optimizer="adamw", mult=m, rank_of=lambda D, s, l: D / 4)
        put(db, optimizer="muon", mult=m, rank_of=lambda D, s, l: D / 4 if s == 100 else 2 * np.sqrt(D))
        put(db, optimizer="adamw", mult=m, n_head=8, rank_of=lambda D, s, l: D / 4)
        put(db, optimizer="muon", mult=m, n_head=8, rank_of=lambda D, s, l: 1.5 * D**0.6)
    return db


def by_key(rows, *keys):
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r for r in rows}


def test_beta_by_factors_metric_window_step_and_where(planted):
    rows, _ = query(planted, "beta", "--by", "optimizer,n_head")
    b = by_key(rows, "optimizer", "n_head")
    assert b[("AdamW", 4)]["beta_hard"] == pytest.approx(1.0, abs=1e-3)
    assert b[("Muon", 4)]["beta_hard"] == pytest.approx(0.5, abs=2e-3)
    assert b[("Muon", 8)]["beta_hard"] == pytest.approx(0.6, abs=2e-3)
    rows, _ = query(planted, "beta", "--metric", "renyi:inf", "--where", "n_head = 4")
    assert by_key(rows, "optimizer")["AdamW"]["beta"] == pytest.approx(1.0, abs=1e-6)  # flat: R_∞ = ⌊rank⌋
    assert {r["metric"] for r in rows} == {"renyi:inf"}
    rows, _ = query(planted, "beta", "--step", "100", "--where", "n_head = 4")
    assert by_key(rows, "optimizer")["Muon"]["beta_hard"] == pytest.approx(1.0, abs=1e-3)
    rows, _ = query(planted, "beta", "--window", "3", "--where", "n_head = 4")  # median of 3 steps: 2√D
    assert by_key(rows, "optimizer")["Muon"]["beta_hard"] == pytest.approx(0.5, abs=2e-3)
    rows, _ = query(planted, "beta", "--layer", "each", "--where", "n_head = 4")
    assert {(r["optimizer"], r["layer"]) for r in rows} == {("AdamW", 0), ("AdamW", 1), ("Muon", 0), ("Muon", 1)}


def test_seed_bootstrap_interval_covers_the_planted_beta(tmp_path):
    db = tmp_path / "s.duckdb"
    rng = np.random.default_rng(0)
    for m in MULTS:  # seed noise, independent per width; the planted exponent is 0.7
        for seed in range(6):
            noise = float(np.exp(rng.normal(0, 0.03)))
            put(db, mult=m, seed=seed, rank_of=lambda D, s, l, e=noise: 0.2 * D**0.7 * e, layers=1)
    rows, _ = query(db, "beta")
    r = rows[0]
    assert r["n_seeds"] == 6
    assert r["beta_hard_boot_low"] < 0.7 < r["beta_hard_boot_high"]
    assert r["beta_hard_boot_high"] - r["beta_hard_boot_low"] < 0.3


def test_fits_need_three_widths(tmp_path):
    db = tmp_path / "w.duckdb"
    for m in (1, 2):
        put(db, mult=m, rank_of=lambda D, s, l: D / 4)
    for m in (1, 2, 4):
        put(db, optimizer="muon", mult=m, rank_of=lambda D, s, l: D / 4)
    rows, err = query(db, "beta")
    b = by_key(rows, "optimizer")
    assert b["AdamW"]["beta_hard"] is None and b["Muon"]["beta_hard"] == pytest.approx(1, abs=1e-3)
    assert "AdamW: 2 widths; a fit needs at least 3 (refused)" in err
    assert "Muon: fit on only 3 widths" in err


def test_matched_finds_the_planted_pair(tmp_path):
    db = tmp_path / "m.duckdb"
    for m in MULTS:
        put(db, optimizer="adamw", steps=300, mult=m, ppl=50.0, rank_of=lambda D, s, l: D / 4)
        put(db, optimizer={"name": "dion", "rank_fraction": 0.0625}, steps=300, mult=m, ppl=50.0 * 1.02,
            rank_of=lambda D, s, l: 2 * np.sqrt(D))
        put(db, optimizer="adamw", steps=600, mult=m, ppl=40.0, rank_of=lambda D, s, l: 2 * np.sqrt(D))
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
    for name, (b4, b8) in betas.items():
        for m in MULTS:
            put(db, optimizer=name, mult=m, n_head=4, rank_of=lambda D, s, l, b=b4: D**b)
            put(db, optimizer=name, mult=m, n_head=8, rank_of=lambda D, s, l, b=b8: D**b)
    rows, err = query(db, "delta", "--arch", "n_head", "--baseline", "adamw", "--reference", "4")
    assert len(rows) == 6  # 3 optimizers × hard/soft, stratum all only
    hard = by_key([r for r in rows if r["metric"] == "hard"], "optimizer")
    assert hard["AdamW"]["arch_shift"] == pytest.approx(0.05, abs=5e-3)
    assert hard["Muon"]["optimizer_gain"] == pytest.approx(0.3, abs=5e-3)
    assert [hard[o]["passes"] for o in ("AdamW", "Muon", "NorMuon")] == [True, True, False]
    assert "4 of 6 comparisons" in err


def test_where_rejects_injection_and_leaves_the_store_alone(planted):
    before = hashlib.sha256(planted.read_bytes()).hexdigest()
    for bad in ("1=1; DROP TABLE runs", "n_head = 4 -- comment", "nope_column = 1"):
        _, err = query(planted, "beta", "--where", bad, code=2)
        assert err.startswith("--where:") and "\n" not in err.strip()
    assert hashlib.sha256(planted.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("statement", ["INSERT INTO runs (run_id) VALUES ('x')", "DELETE FROM runs",
                                       "DROP TABLE runs", "ATTACH ':memory:' AS m",
                                       "COPY runs TO 'leak.csv'", "SELECT 1; DROP TABLE runs"])
def test_sql_refuses_writes(planted, statement, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = hashlib.sha256(planted.read_bytes()).hexdigest()
    result = runner.invoke(app, ["sql", statement, "--db", str(planted)])
    assert result.exit_code == 2 and result.stderr.startswith("sql:")
    assert hashlib.sha256(planted.read_bytes()).hexdigest() == before
    assert not (tmp_path / "leak.csv").exists()


def test_sql_from_file_and_stdin(planted, tmp_path):
    q = tmp_path / "q.sql"
    q.write_text("-- runs per optimizer\nSELECT optimizer, count(*) AS n FROM runs GROUP BY 1 ORDER BY 1")
    out = runner.invoke(app, ["sql", "--file", str(q), "--db", str(planted), "--format", "csv"])
    assert out.exit_code == 0 and out.stdout == "optimizer,n\nAdamW,8\nMuon,8\n"
    out = runner.invoke(app, ["sql", "-", "--db", str(planted), "--format", "json"], input="SELECT 41 + 1 AS x")
    assert json.loads(out.stdout) == [{"x": 42}]


def test_betas_view_matches_query_beta_value_by_value(tmp_path):
    """Two n_head and two steps values: the view fits each configuration apart (it used to pool
    them by optimizer) and applies the 3-width floor, exactly as `query beta --by …` does."""
    db = tmp_path / "b.duckdb"
    for n_head, steps, slope in ((4, 300, 1.0), (8, 300, 0.5), (4, 600, 0.75)):
        for mult in (1, 2, 4, 8):
            put(db, mult=mult, n_head=n_head, steps=steps, rank_of=lambda D, s, l, b=slope: 0.5 * D**b)
    put(db, optimizer="muon", mult=1, rank_of=lambda D, s, l: D / 4)  # 2 widths: no fit anywhere
    put(db, optimizer="muon", mult=2, rank_of=lambda D, s, l: D / 4)
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


def test_plots_have_the_expected_series(planted, tmp_path):
    con = duckdb.connect(str(planted), read_only=True)
    try:
        fig = plots.scaling(con, Selection(("all",), where="n_head = 4"))
        assert len(fig.axes) == 2 and all(len(ax.lines) == 2 for ax in fig.axes)  # one fit per optimizer
        assert all(len(ax.collections) >= 2 for ax in fig.axes)  # points (+ bands)
        fig = plots.dynamics(con)
        assert all(len(ax.lines) == 2 for ax in fig.axes)
        fig = plots.depth(con)
        assert all(len(ax.lines) == 2 for ax in fig.axes)
        fig = plots.renyi(con, ffn_mult=2)
        assert len(fig.axes) == 3 and all(len(ax.lines) == 2 for ax in fig.axes)
        assert len(fig.axes[0].lines[0].get_xdata()) == 7  # α = 0.5 … ∞
    finally:
        con.close()
    for kind, extra in (("scaling", []), ("dynamics", []), ("depth", []), ("renyi", ["--ffn-mult", "2"])):
        out = tmp_path / f"{kind}.png"
        result = runner.invoke(app, ["plot", kind, "-o", str(out), "--db", str(planted), *extra])
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:4] == b"\x89PNG"
    svg = tmp_path / "s.svg"
    assert runner.invoke(app, ["plot", "scaling", "-o", str(svg), "--db", str(planted)]).exit_code == 0
    assert svg.read_text().lstrip().startswith("<?xml")


def test_the_scaling_plot_shows_query_betas_numbers_and_floor(tmp_path):
    db = tmp_path / "p.duckdb"
    for mult in (1, 2, 4):
        put(db, mult=mult, rank_of=lambda D, s, l: 0.5 * D**0.8)
    for mult in (1, 2):  # two widths: `query beta` refuses the fit, so must the figure
        put(db, optimizer="muon", mult=mult, rank_of=lambda D, s, l: D / 4)
    rows, _ = query(db, "beta")
    con = duckdb.connect(str(db), read_only=True)
    try:
        fig = plots.scaling(con, Selection(("all",)))
    finally:
        con.close()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"AdamW: β={by_key(rows, 'optimizer')['AdamW']['beta_hard']:.2f}", "Muon: no fit (< 3 widths)"]
    assert len(fig.axes[0].collections) == 3  # two point clouds, one band


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_round_trips_every_table(planted, tmp_path, fmt):
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", "--format", fmt, str(out), "--db", str(planted)])
    assert result.exit_code == 0, result.output
    con = duckdb.connect(str(planted), read_only=True)
    try:
        for name in store.EXPORTED:
            n = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            reader = "read_parquet" if fmt == "parquet" else "read_csv_auto"
            back = duckdb.sql(f"SELECT count(*) FROM {reader}('{out / f'{name}.{fmt}'}')").fetchall()[0][0]
            assert back == n, name
    finally:
        con.close()


def test_schema_is_json_schema_of_the_spec():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert {"data", "model", "train", "optimizer", "measure", "resources", "sweep"} <= set(schema["properties"])
    import jsonschema
    import yaml
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in [root / "experiments.yaml", *sorted((root / "examples").glob("*.yaml"))]:
        doc = yaml.safe_load(path.read_text())
        doc.pop("sweep")  # axes hold lists of values, not values (the schema says only that)
        jsonschema.validate(doc, schema)  # every shipped spec is valid under its schema
    for bad in ({"model": {"ffn_mult": -1}}, {"optimizer": {"name": "adamx"}}, {"train": {"stepz": 5}},
                {"measure": {"sites": ["middle"]}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
