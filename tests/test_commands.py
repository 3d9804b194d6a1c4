"""The commands around the verbs on a planted_factors store: --where and SQL refusals, plots, export, schema."""

import hashlib
import json

import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import by_key, planting, put, query  # noqa: F401
from spectraldb import plots, store
from spectraldb.selection import Selection

runner = CliRunner()



def test_where_rejects_injection_and_leaves_the_store_alone(planted_factors):
    before = hashlib.sha256(planted_factors.read_bytes()).hexdigest()
    for bad in ("1=1; DROP TABLE runs", "n_head = 4 -- comment", "nope_column = 1"):
        _, err = query(planted_factors, "beta", "--where", bad, code=2)
        assert err.startswith("--where:") and "\n" not in err.strip()
    assert hashlib.sha256(planted_factors.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("statement", ["INSERT INTO runs (run_id) VALUES ('x')", "DELETE FROM runs",
                                       "DROP TABLE runs", "ATTACH ':memory:' AS m",
                                       "COPY runs TO 'leak.csv'", "SELECT 1; DROP TABLE runs"])
def test_sql_refuses_writes(planted_factors, statement, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = hashlib.sha256(planted_factors.read_bytes()).hexdigest()
    result = runner.invoke(app, ["sql", statement, "--db", str(planted_factors)])
    assert result.exit_code == 2 and result.stderr.startswith("sql:")
    assert hashlib.sha256(planted_factors.read_bytes()).hexdigest() == before
    assert not (tmp_path / "leak.csv").exists()


def test_sql_from_file_and_stdin(planted_factors, tmp_path):
    q = tmp_path / "q.sql"
    q.write_text("-- runs per optimizer\nSELECT optimizer, count(*) AS n FROM runs GROUP BY 1 ORDER BY 1")
    out = runner.invoke(app, ["sql", "--file", str(q), "--db", str(planted_factors), "--format", "csv"])
    assert out.exit_code == 0 and out.stdout == "optimizer,n\nAdamW,8\nMuon,8\n"
    out = runner.invoke(app, ["sql", "-", "--db", str(planted_factors), "--format", "json"], input="SELECT 41 + 1 AS x")
    assert json.loads(out.stdout) == [{"x": 42}]


@pytest.mark.slow  # renders four figures; test_the_scaling_plot_shows_query_betas_numbers_and_floor stays fast
def test_plots_have_the_expected_series(planted_factors, tmp_path):
    con = duckdb.connect(str(planted_factors), read_only=True)
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
        result = runner.invoke(app, ["plot", kind, "-o", str(out), "--db", str(planted_factors), *extra])
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:4] == b"\x89PNG"
    svg = tmp_path / "s.svg"
    assert runner.invoke(app, ["plot", "scaling", "-o", str(svg), "--db", str(planted_factors)]).exit_code == 0
    assert svg.read_text().lstrip().startswith("<?xml")


NONE_MATCH = "no finished run of the store's 16 has values for this selection (stratum all, site post, where seed = 99)"


@pytest.mark.parametrize("kind, args, why", [
    ("scaling", ["--where", "seed = 99"], NONE_MATCH),
    ("dynamics", ["--where", "seed = 99"], NONE_MATCH),
    ("trajectories", ["--where", "seed = 99"], NONE_MATCH),
    ("depth", ["--where", "seed = 99"], NONE_MATCH),
    ("dynamics", ["--where", "ffn_mult <= 2"], "no group has a fit (a fit needs 3 widths)"),
    ("renyi", ["--ffn-mult", "3"], "no finished run at ffn_mult 3 in this selection (its widths: 1, 2, 4, 8)")])
def test_a_figure_with_nothing_to_draw_is_one_line_and_no_file(planted_factors, tmp_path, kind, args, why):
    out = tmp_path / "x.png"
    result = runner.invoke(app, ["plot", kind, "-o", str(out), "--db", str(planted_factors), *args])
    assert result.exit_code == 2 and result.stderr == f"plot {kind}: nothing to draw: {why}\n", result.output
    assert not out.exists()


def test_the_scaling_plot_shows_query_betas_numbers_and_floor(tmp_path):
    db = tmp_path / "p.duckdb"
    with planting(db) as plant:
        for mult in (1, 2, 4):
            plant(mult=mult, rank_of=lambda D, s, l: 0.5 * D**0.8)
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
def test_export_round_trips_every_table(planted_factors, tmp_path, fmt):
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", "--format", fmt, str(out), "--db", str(planted_factors)])
    assert result.exit_code == 0, result.output
    con = duckdb.connect(str(planted_factors), read_only=True)
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
    from spectraldb.spec.checkpoints import is_checkpoints_spec

    for path in [root / "experiments.yaml", *sorted((root / "examples").glob("*.yaml"))]:
        if is_checkpoints_spec(path):
            continue  # another kind of spec (specdb measure), checked by tests/test_examples.py
        doc = yaml.safe_load(path.read_text())
        doc.pop("sweep")  # axes hold lists of values, not values (the schema says only that)
        jsonschema.validate(doc, schema)  # every shipped spec is valid under its schema
    for bad in ({"model": {"ffn_mult": -1}}, {"optimizer": {"name": "adamx"}}, {"train": {"stepz": 5}},
                {"measure": {"sites": ["middle"]}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
