"""The read API: one Selection at each edge, typed answers, and the notebook's `spectraldb.open`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

import spectraldb
from contract.vocabulary import PROTOCOL
from cli.main import app
from spectraldb import catalog, plots, queries, store
from spectraldb.errors import QueryError, StoreError
from spectraldb.fits import power_law
from spectraldb.selection import Selection
from tests.conftest import planting

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("reader") / "r.duckdb"
    for opt, slope in (("adamw", 0.5), ("muon", 0.9)):
        with planting(path) as plant:
            for mult in (1, 2, 4, 8):
                for seed in (0, 1):
                    plant(optimizer=opt, mult=mult, seed=seed, strata={"all": 1.0, "tail": 0.5},
                        rank_of=lambda D, s, l, k=slope, seed=seed: (2 + seed * 0.1) * D**k)
    return path


def cli_json(db, *args):
    result = runner.invoke(app, [*args, "--db", str(db), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_notebook_gets_the_clis_tail_beta_as_arrow(db):
    answer = spectraldb.open(db).beta(strata="tail")
    table = answer.to_arrow()
    assert isinstance(table, pa.Table) and table.num_rows == 2
    assert table.column("optimizer").to_pylist() == ["AdamW", "Muon"]
    cli = cli_json(db, "query", "beta", "--stratum", "tail")
    assert table.to_pylist() == cli
    assert table.column("beta_hard").to_pylist() == pytest.approx([0.5, 0.9], abs=0.02)


def test_a_group_fit_keeps_the_whole_power_law(db):
    answer = spectraldb.open(db).beta(strata="tail")
    for group, row in zip(answer.groups, answer.rows):
        fit = group.fits["hard"]
        assert fit.beta == row["beta_hard"] and fit.r2 == row["r2_hard"]
        again = power_law(group.widths, group.means["hard"])
        assert fit.intercept == again.intercept and fit.beta == again.beta
        assert group.n_seeds == 2 and row["n_seeds"] == 2


def test_to_pandas_has_the_same_rows(db):
    frame = spectraldb.open(db).beta(strata="tail", by="optimizer").to_pandas()
    assert list(frame["optimizer"]) == ["AdamW", "Muon"] and "beta_hard_boot_low" in frame.columns


def test_the_reader_lists_runs_and_reads_one_run_and_spectrum(db):
    reader = spectraldb.open(db)
    runs = reader.runs(optimizer="Muon")
    assert len(runs.rows) == 8 and {r["optimizer"] for r in runs.rows} == {"Muon"}
    one = reader.run(runs.rows[0]["run_id"])
    assert one["run"]["run_id"] == runs.rows[0]["run_id"] and one["evals"] and one["ranks"]
    spec = reader.spectrum(runs.rows[0]["run_id"], stratum="tail")
    assert spec["step"] == 300 and len(spec["eigenvalues"]) == spec["n_dim"]
    assert reader.run("nope") is None and reader.spectrum("nope") is None
    assert reader.status().to_arrow().column("runs").to_pylist() == [16]
    assert reader.sql("SELECT count(*) AS n FROM runs").column("n").to_pylist() == [16]


def test_the_reader_refuses_what_the_cli_refuses(db, tmp_path):
    reader = spectraldb.open(db)
    with pytest.raises(QueryError, match="--stratum: unknown stratum 'tial'"):
        reader.beta(strata="tial")
    with pytest.raises(QueryError, match="refused"):
        reader.sql("DELETE FROM runs")
    with pytest.raises(QueryError, match="subqueries are not allowed"):
        reader.beta(where="seed IN (SELECT 1)")
    with pytest.raises(StoreError, match="no such store"):
        spectraldb.open(tmp_path / "none.duckdb")


@pytest.mark.parametrize("fields, message", [
    (dict(window=0), "--window: must be at least 1"), (dict(window=True), "--window"),
    (dict(layer="some"), "--layer: expected agg or each"), (dict(site="mid"), "--site"),
    (dict(by="optimizer,Colour!"), "--by: unknown factor .Colour!."), (dict(strata=""), "--stratum"),
    (dict(strata=["all", "nope"]), "--stratum: unknown stratum 'nope'"), (dict(step="3"), "--step"),
    (dict(where=3), "--where: must be text"),
])
def test_a_selection_checks_its_fields(fields, message):
    with pytest.raises(QueryError, match=message):
        Selection(**fields)


def test_a_selection_reads_options_as_the_cli_and_http_give_them():
    sel = Selection(strata=["all,tail"], by=["optimizer", "n_head,seed"], where="  ")
    assert sel.strata == ("all", "tail") and sel.by == ("optimizer", "n_head", "seed") and sel.where is None
    assert sel.stratum == "all" and Selection().stratum == "all" and Selection().group_by() == ("optimizer",)
    assert Selection(strata=()).strata is None and Selection(strata=[]).strata is None  # not asked: the default


def test_the_scaling_figure_uses_the_querys_fits_once(db, monkeypatch):
    """β is fitted once per figure: the series' lines come from the query's own PowerLaw."""
    from spectraldb import fits

    calls = []
    real = fits.power_law
    monkeypatch.setattr(fits, "power_law", lambda *a: calls.append(1) or real(*a))
    with store.connect(db, read_only=True) as con:
        series, _ = plots.scaling_series(con, Selection(strata="tail"))
        expect = queries.beta(con, Selection(strata="tail")).rows
    n_fits_per_answer = len(calls) // 2
    assert n_fits_per_answer == 2 * 2  # two groups × (hard, soft): no refit for the lines
    for item, row in zip(series["hard"], expect):
        assert item["beta"] == row["beta_hard"] and item["line"]["y"][0] > 0


def test_the_catalog_is_what_status_and_the_service_read(db):
    with store.connect(db, read_only=True) as con:
        assert catalog.status_counts(con) == {"done": 16}
        assert catalog.count_runs(con, where="seed = 1") == 8
        assert catalog.protocols(con) == {PROTOCOL: 16}
        assert catalog.unfinished(con) == []
        assert catalog.status_summary(con).columns == ["status", "runs", "optimizers", "eigenvalue_mib", "mib_per_run"]


def test_the_notebook_example_prints_tail_beta(db):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "notebook.py"), str(db)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "beta_hard" in out.stdout and "AdamW" in out.stdout and "Muon" in out.stdout
    assert "ln(hard rank) ≈" in out.stdout


def test_a_predicate_is_checked_once_per_question(db, monkeypatch):
    """Checking a predicate parses it twice and binds it (three statements): a question checks it
    once; a writer re-checks every time (the report's count: tests/test_report.py)."""
    from spectraldb import predicates
    from spectraldb.verbs import VERBS

    checked = []
    real = predicates._check_where
    monkeypatch.setattr(predicates, "_check_where", lambda con, where: checked.append(where) or real(con, where))
    reader = spectraldb.open(db)
    for verb in VERBS:
        checked.clear()
        getattr(reader, verb.name)(**{o.name: 2.0 for o in verb.options if o.required}, where="seed = 0")
        assert checked == ["seed = 0"], verb.name
    checked.clear()
    with store.connect(db) as con:  # a writer's runs may change between checks
        predicates.check_where(con, "seed = 0")
        predicates.check_where(con, "seed = 0")
    assert checked == ["seed = 0", "seed = 0"]


def test_held_values_are_bound_never_written_into_the_sql(db):
    """The report's baseline and delta's protocol hold factors at values read from the store; a
    value is compared as a value, whatever it holds, and an unknown factor is refused."""
    with store.connect(db, read_only=True) as con:
        everyone = queries.beta(con, Selection(strata="tail")).rows
        assert queries.beta(con, Selection(strata="tail", held=(("seed", 1),))).rows != everyone
        hostile = Selection(strata="tail", held=(("optimizer", "AdamW') OR TRUE OR ('"),))
        assert [r["beta_hard"] for r in queries.beta(con, hostile).rows] == []
        same = Selection(strata="tail", where="optimizer = 'AdamW'")
        held = Selection(strata="tail", held=(("optimizer", "AdamW"),))
        assert queries.beta(con, held).rows == queries.beta(con, same).rows
        with pytest.raises(QueryError, match="^held: unknown factor 'colour'"):
            queries.beta(con, Selection(held=(("colour", "red"),)))


def test_one_reader_holds_one_connection_for_many_questions(db, monkeypatch):
    """`with spectraldb.open(path) as r:` asks every question on one read-only connection: the
    predicate is checked once for all of them, and the same rows come back as without it."""
    from spectraldb import predicates

    checked = []
    real = predicates._check_where
    monkeypatch.setattr(predicates, "_check_where", lambda con, where: checked.append(where) or real(con, where))
    reader = spectraldb.open(db)
    alone = [reader.beta(where="seed = 1").rows, reader.depth(where="seed = 1").rows]
    assert checked == ["seed = 1", "seed = 1"]
    checked.clear()
    with reader as held:
        together = [held.beta(where="seed = 1").rows, held.depth(where="seed = 1").rows,
                    held.ask("dynamics", {"where": "seed = 1"}).rows]
    assert checked == ["seed = 1"] and together[:2] == alone and together[2]
    assert reader.beta(where="seed = 1").rows == alone[0]  # closed again: a call opens its own


def test_asking_a_question_that_is_not_declared_is_one_line(db):
    with pytest.raises(QueryError, match=r"^'betta' is not a question \(expected one of: beta, dynamics"):
        spectraldb.open(db).ask("betta", {})


def test_the_driver_reads_what_is_stored_through_the_reader(db, tmp_path):
    """`stored_statuses` (what `specdb run` skips): every run's status, {} before a store exists,
    and a folder in the store's place refused in one line rather than read as "nothing stored"."""
    from spectraldb.reader import stored_statuses

    found = stored_statuses(db)
    assert len(found) == 16 and set(found.values()) == {"done"}
    assert found == spectraldb.open(db).statuses()
    assert sum(spectraldb.open(db).status_counts().values()) == 16
    assert stored_statuses(tmp_path / "none.duckdb") == {}
    with pytest.raises(StoreError, match="is a folder"):
        stored_statuses(tmp_path)


def test_a_figure_the_store_does_not_draw_is_refused_in_one_line(db):
    with pytest.raises(QueryError, match=r"^plot: unknown figure 'pie' \(expected one of: scaling, "):
        spectraldb.open(db).figure("pie", Selection())


def test_an_empty_answer_says_why(db, tmp_path):
    """An empty table alone reads like a broken command: the answer's note says what was asked of
    how many runs, or that the store holds none."""
    answer = spectraldb.open(db).beta(where="seed = 9", strata="tail")
    assert answer.rows == [] and answer.notes == ["no finished run of the store's 16 has values for this selection "
                                                  "(stratum tail, site post, where seed = 9)"]
    with store.connect(tmp_path / "empty.duckdb"):
        pass
    for verb in ("beta", "dynamics", "trajectories", "depth"):
        assert getattr(spectraldb.open(tmp_path / "empty.duckdb"), verb)().notes == [
            "the store holds no runs (run `specdb run SPEC` first)"], verb
