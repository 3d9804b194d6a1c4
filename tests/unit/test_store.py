import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb import store
from spectraldb.store import rows as store_rows
from spectraldb.errors import StoreError
from spectraldb.spec import RunSpec
from contract.metrics import hard_rank
from tests.builders import evaluations, ranked, result, spectrum
from tests.conftest import flat

runner = CliRunner()

COLUMNS = {
    "runs": ["run_id", "spec_name", "optimizer", "optimizer_name", "lr", "ffn_mult", "ffn_width", "d_model",
             "n_layer", "n_head", "context", "vocab_size", "corpus", "seed", "steps", "batch_size",
             "measure_source", "last_k", "status", "error", "final_val_loss", "final_val_ppl", "config",
             "git_commit", "versions", "host", "device", "started_at", "finished_at", "duration_s",
             "pos", "norm", "postln_frac", "activation", "keep_eigenvalues", "protocol", "source", "gated",
             "site_definition", "strata_scope", "tokens_seen", "factors", "workers", "reduction",
             "forward_dtype"],
    "evals": ["run_id", "step", "train_loss", "val_loss", "val_ppl"],
    "spectra": ["run_id", "step", "layer", "site", "stratum", "n_tokens", "n_dim", "skipped",
                "min_eigenvalue", "eigenvalues"],
    "ranks": ["run_id", "step", "layer", "site", "stratum", "n_tokens", "soft_rank", "hard_rank",
              "spectral_entropy", "renyi_0_5", "renyi_1", "renyi_1_5", "renyi_2", "renyi_3", "renyi_5",
              "renyi_inf", "eee", "from_end"],
    "run_points": ["run_id", "site", "stratum", "metric", "value", "n_layers", "n_tokens"],
    "step_points": ["run_id", "site", "stratum", "metric", "step", "value", "n_layers", "n_tokens"],
    "reinjection": ["run_id", "step", "layer", "stratum", "js_divergence", "rho_0_5", "rho_1", "rho_1_5",
                    "rho_2", "rho_3", "rho_5", "rho_inf"],
}


def columns(con, table):
    return [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table]).fetchall()]


def test_migrations_create_exactly_these_columns(tmp_path):
    with store.connect(tmp_path / "s.duckdb") as con:
        for table, cols in COLUMNS.items():
            assert columns(con, table) == cols
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == store.SCHEMA_VERSION
    with store.connect(tmp_path / "s.duckdb") as con:  # idempotent
        assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(store.migrations())


def fake_result(ranks_by_step_layer: dict, dim: int, status="done"):
    """(step, layer) → the `all` stratum's hard rank at both sites."""
    return ranked({(step, layer, "all"): r for (step, layer), r in ranks_by_step_layer.items()}, dim, status=status)


def test_points_view_takes_median_of_last_k_steps_then_over_layers(tmp_path):
    db = tmp_path / "s.duckdb"
    run = RunSpec.model_validate({"model": {"ffn_mult": 1, "d_model": 64}, "measure": {"last_k": 2, "every": 10},
                                  "train": {"steps": 30}})
    # layer 0: steps 10/20/30 → 5, 8, 12 (median of last 2 = 10); layer 1: 2, 20, 30 (= 25)
    res = fake_result({(10, 0): 5, (20, 0): 8, (30, 0): 12, (10, 1): 2, (20, 1): 20, (30, 1): 30}, 64)
    store.write_run(db, run, res, {"versions": {}})
    with store.connect(db, read_only=True) as con:
        rows = con.execute("SELECT metric, value, n_layers, low_n FROM points WHERE site='post' "
                           "AND metric IN ('soft', 'hard') ORDER BY metric").fetchall()
    assert rows == [("hard", pytest.approx(17.5), 2, False), ("soft", pytest.approx(17.5, rel=1e-6), 2, False)]


def test_write_run_is_one_transaction(tmp_path, monkeypatch):
    db = tmp_path / "s.duckdb"
    run = RunSpec.model_validate({"train": {"steps": 200}})
    res = fake_result({(100, 0): 3}, 256)
    monkeypatch.setattr(store_rows, "rank_rows", lambda rid, recs: [{"run_id": rid, "step": 1, "layer": 0, "site": "post",
                                                               "stratum": "all", "n_tokens": 1, "soft_rank": None}])
    with pytest.raises(duckdb.Error):
        store.write_run(db, run, res, {})
    with store.connect(db, read_only=True) as con:
        for table in COLUMNS:
            assert con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


def test_ranks_are_computed_from_stored_eigenvalues(tmp_path):
    db = tmp_path / "s.duckdb"
    run = RunSpec.model_validate({"train": {"steps": 200}})
    store.write_run(db, run, fake_result({(100, 0): 7}, 256), {})
    with store.connect(db, read_only=True) as con:
        eig, hard = con.execute("SELECT s.eigenvalues, r.hard_rank FROM spectra s JOIN ranks r "
                                "USING (run_id, step, layer, site, stratum) LIMIT 1").fetchone()
    assert hard == pytest.approx(hard_rank(eig)) and hard == pytest.approx(7)
    assert eig == sorted(eig, reverse=True)


def test_not_a_store_and_newer_schema_are_exit_2(tmp_path):
    junk = tmp_path / "junk.duckdb"
    junk.write_text("this is not a database")
    result = runner.invoke(app, ["query", "beta", "--db", str(junk)])
    assert result.exit_code == 2 and "not a specdb store" in result.stderr
    newer = tmp_path / "newer.duckdb"
    with store.connect(newer) as con:
        con.execute("INSERT INTO schema_version VALUES (999, 'future', now())")
    with pytest.raises(StoreError, match="newer than this specdb"):
        with store.connect(newer, read_only=True):
            pass
    for cmd in (["query", "beta"], ["sql", "SELECT 1"], ["status"]):
        result = runner.invoke(app, [*cmd, "--db", str(newer)])
        assert result.exit_code == 2 and "newer than this specdb" in result.stderr
    result = runner.invoke(app, ["query", "beta", "--db", str(tmp_path / "missing.duckdb")])
    assert result.exit_code == 2 and "no such store" in result.stderr


def test_sql_is_read_only(tmp_path):
    db = tmp_path / "s.duckdb"
    store.write_run(db, RunSpec.model_validate({"train": {"steps": 200}}), fake_result({(100, 0): 7}, 256), {})
    result = runner.invoke(app, ["sql", "DELETE FROM runs", "--db", str(db)])
    assert result.exit_code == 2
    result = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM runs", "--db", str(db), "--format", "csv"])
    assert result.exit_code == 0 and result.stdout == "n\n1\n"


@pytest.mark.parametrize("name", ["it's.duckdb", "a b;--'.duckdb", "ü ñ (1).duckdb"])
def test_a_store_path_with_quotes_and_separators_is_attached_literally(tmp_path, name):
    """Writers attach the store by a quoted literal (for its row-group size): a hostile name must
    still name exactly that file."""
    db = tmp_path / name
    run = RunSpec.model_validate({"model": {"d_model": 32, "ffn_mult": 1}, "train": {"steps": 2},
                                  "measure": {"every": 1, "last_k": 1}})
    res = result("done", [spectrum(2, 0, "post", "all", flat(4.0, 32), 100)], evaluations([2], 3.0, 3.0, 20.0))
    assert store.write_run(db, run, res, {}) == "done"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".duckdb") == [name]
    with store.connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM ranks").fetchone()[0] == 1


def test_a_store_path_with_a_backslash_is_refused_in_one_line(tmp_path):
    """DuckDB reads a backslash as a folder separator: the store would land in another folder."""
    db = tmp_path / "x\\y.duckdb"
    with pytest.raises(StoreError, match="backslash"):
        store.connect(db).__enter__()
    result = CliRunner().invoke(app, ["run", "experiments.yaml", "--db", str(db), "--executor", "inline"])
    assert result.exit_code == 2 and "backslash" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
