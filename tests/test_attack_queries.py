"""Attacks through what a reader controls: the --where predicate, the store file itself."""

import json
import os
import sqlite3
import time

import duckdb
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb import queries, store
from spectraldb.selection import Selection
from spectraldb.store import opening
from spectraldb.errors import QueryError, SpecError, StoreError
from spectraldb.verbs import BY_NAME, VERBS
from tests.conftest import planting, query

runner = CliRunner()
SECRET = "TOP-SECRET-4711"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """AdamW rank D/4 (β 1) at 4 widths, plus one diverged AdamW run with rank √D."""
    path = tmp_path_factory.mktemp("attack") / "s.duckdb"
    with planting(path) as plant:
        for mult in (1, 2, 4, 8):
            plant(mult=mult, rank_of=lambda D, step, layer: D / 4)
        plant(mult=1, seed=1, status="diverged", rank_of=lambda D, step, layer: np.sqrt(D))
    (path.parent / "secret.txt").write_text(SECRET)
    return path


def cli(db, *args):
    result = runner.invoke(app, [*args, "--db", str(db)])
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    return result


HOSTILE = [
    ("error((SELECT content FROM read_text('{secret}')))", "subqueries are not allowed"),
    ("(SELECT count(*) FROM glob('/root/*')) > 0", "subqueries are not allowed"),
    ("read_text('{secret}') IS NOT NULL", "table function"),
    ("TRUE) UNION SELECT run_id FROM spectra WHERE (TRUE", "must be one predicate"),
    ("TRUE) GROUP BY (run_id", "must be one predicate"),
    ("seed = 0; DROP TABLE runs", "not a valid predicate"),
    ("p.site = 'pre'", "only columns of the runs table"),
    ("(" * 3000 + "TRUE" + ")" * 3000, "longer than"),
]


@pytest.mark.parametrize("where, message", HOSTILE)
@pytest.mark.parametrize("verb", [["query", "beta"], ["query", "matched"], ["query", "dynamics"],
                                  ["plot", "scaling", "-o", "never.png"]])
def test_hostile_predicates_are_refused_in_one_line(db, tmp_path, verb, where, message):
    where = where.format(secret=db.parent / "secret.txt")
    verb = [str(tmp_path / v) if v.endswith(".png") else v for v in verb]
    result = cli(db, *verb, "--where", where)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert SECRET not in result.output and not (tmp_path / "never.png").exists()


def beta_rows(db, *extra):
    result = cli(db, "query", "beta", "--format", "json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


@pytest.mark.parametrize("verb", [v.name for v in VERBS])
def test_a_parenthesis_escape_is_refused_by_every_verb(db, verb):
    """'TRUE) OR (TRUE' parses only inside the parentheses a verb adds: an unbalanced predicate is
    refused in one line by every declared question, at the CLI and at its HTTP route alike."""
    plain, plain_err = beta_rows(db)
    assert plain[0]["beta_hard"] == pytest.approx(1.0, abs=1e-6) and "excluded 1 diverged run" in plain_err
    required = {o.name: 1.0 for o in BY_NAME[verb].options if o.required}
    args = [a for name, v in required.items() for a in (f"--{name.replace('_', '-')}", str(v))]
    result = cli(db, "query", verb, *args, "--where", "TRUE) OR (TRUE")
    assert result.exit_code == 2 and "parentheses must balance" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    from fastapi.testclient import TestClient

    from spectraldb.service import create_app

    response = TestClient(create_app(db), base_url="http://localhost").get(
        f"/api/{verb}", params={"where": "TRUE) OR (TRUE", **required})
    assert response.status_code == 400 and "parentheses must balance" in response.json()["detail"]


def test_excluded_diverged_counts_only_what_the_predicate_selects(db):
    _, err = beta_rows(db, "--where", "seed = 0")
    assert "diverged" not in err
    _, err = beta_rows(db, "--where", "seed = 1")
    assert "excluded 1 diverged run" in err


def test_a_predicate_failing_at_run_time_does_not_print_values(db):
    result = cli(db, "query", "beta", "--where", "CAST(corpus AS INTEGER) > 0")
    assert result.exit_code == 2 and "failed while being evaluated" in result.stderr
    assert "sotu" not in result.output  # the corpus value DuckDB's message would quote


def test_read_connections_cannot_reach_files_or_change_that(db):
    with store.connect(db, read_only=True) as con:
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone()[0] is False
        for sql in ("SET enable_external_access = true", "INSTALL sqlite", "LOAD sqlite",
                    f"SELECT * FROM read_text('{db.parent / 'secret.txt'}')"):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    with store.connect(db, read_only=True) as con:
        assert queries.check_where(con, "seed < 3 AND runs.n_head = 4").startswith("run_id IN (SELECT run_id")
        with pytest.raises(QueryError):
            queries.check_where(con, "EXISTS (SELECT 1)")


# ---------------------------------------------------------------- damaged and foreign store files

def damaged(tmp_path, db, how):
    bad = tmp_path / f"{how}.duckdb"
    raw = bytearray(db.read_bytes())
    if how == "random":
        raw = bytearray(os.urandom(8192))
    elif how == "header":  # the header block's checksum no longer matches ("…in block at…")
        raw[20:28] = b"\xff" * 8
    elif how == "truncated":
        raw = raw[: len(raw) // 10]
    elif how == "truncated_tail":  # cut inside the last block a table uses: the rest still reads
        con = duckdb.connect(str(db), read_only=True)
        size = con.execute("PRAGMA database_size").fetchone()[2]
        top = max(con.execute("SELECT max(block_id) FROM pragma_storage_info(?)", [t]).fetchone()[0] or 0
                  for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall())
        con.close()
        raw = raw[: 3 * 4096 + top * size + 1000]
    elif how == "sqlite":
        con = sqlite3.connect(bad)
        con.execute("CREATE TABLE runs (x)")
        con.commit()
        con.close()
        return bad
    bad.write_bytes(bytes(raw))
    return bad


@pytest.mark.parametrize("how", ["random", "header", "truncated", "truncated_tail", "sqlite"])
def test_damaged_or_foreign_stores_get_one_line_fast(db, tmp_path, corpus, how):
    bad = damaged(tmp_path, db, how)
    before = bad.read_bytes()
    spec = tmp_path / "s.yaml"
    spec.write_text(f"data: {{corpus: {corpus}}}\ntrain: {{steps: 5}}\nmeasure: {{every: 5}}\n")
    for args in (["query", "beta"], ["status"], ["sql", "SELECT count(*), sum(len(eigenvalues)) FROM spectra"], ["run", str(spec), "--executor", "inline"]):
        t0 = time.monotonic()
        result = cli(bad, *args)
        assert time.monotonic() - t0 < 10, "a damaged store must not be mistaken for a locked one"
        if how == "truncated_tail" and args[0] in ("query", "sql") and result.exit_code == 0:
            continue  # read only intact blocks: answered without the cut part (run and status verify the file)
        assert result.exit_code == 2, (args, result.output)
        line = result.stderr.strip().splitlines()
        assert len(line) == 1 and "locked" not in line[0], result.stderr
        assert ("SQLite" in line[0]) == (how == "sqlite")
    assert bad.read_bytes() == before  # nothing written into it
    assert not (tmp_path / f"{how}.duckdb.spool").exists()


def test_lock_errors_are_told_apart_from_block_errors():
    assert opening._is_lock_error(duckdb.IOException('Could not set lock on file "x": Conflicting lock is held'))
    assert not opening._is_lock_error(duckdb.Error("Corrupt database file: checksum mismatch in block at 0"))


def test_a_folder_or_an_empty_file_as_the_store(tmp_path):
    with pytest.raises(StoreError, match="is a folder"):
        with store.connect(tmp_path, read_only=True):
            pass
    (tmp_path / "empty.duckdb").write_bytes(b"")
    with pytest.raises(StoreError, match="an empty file"):
        with store.connect(tmp_path / "empty.duckdb"):
            pass
    assert (tmp_path / "empty.duckdb").read_bytes() == b""


def test_fits_resting_on_few_tokens_per_dimension_say_so(tmp_path):
    db = tmp_path / "n.duckdb"
    with planting(db) as plant:
        for mult in (1, 2, 4):
            plant(mult=mult, rank_of=lambda D, step, layer: D / 4, n_per_dim=2 if mult == 4 else 50)
    rows, err = beta_rows(db)
    assert rows[0]["min_n_over_d"] == pytest.approx(2.0)
    assert "only 2.0 tokens per dimension (width 128" in err
    for args in (["--layer", "each"], ["--window", "1"]):  # the slow path carries it too
        rows, err = beta_rows(db, *args)
        assert all(r["min_n_over_d"] == pytest.approx(2.0) for r in rows) and "tokens per dimension" in err
    with planting(db) as plant:  # a second optimizer: 2 × 2 layers are 4 groups under the floor, one line
        for mult in (1, 2, 4):
            plant(optimizer="muon", mult=mult, rank_of=lambda D, step, layer: D / 4, n_per_dim=2 if mult == 4 else 50)
    rows, err = query(db, "depth")
    low = [line for line in err.splitlines() if "tokens per dimension" in line]
    assert len(rows) == 4 and all(r["min_n_over_d"] == pytest.approx(2.0) for r in rows)
    assert low == ["4 groups have a point under 4 tokens per dimension (AdamW / 0, AdamW / 1, Muon / 0, …; "
                   "min_n_over_d per row); the fewest: AdamW / 0, 2.0 at width 128 (under 4, its rank is capped by N, "
                   "not by the spectrum)"], low
    db2 = tmp_path / "ok.duckdb"
    with planting(db2) as plant:
        for mult in (1, 2, 4):
            plant(mult=mult, rank_of=lambda D, step, layer: D / 4)
    rows, err = beta_rows(db2)
    assert rows[0]["min_n_over_d"] == pytest.approx(50.0) and "tokens per dimension" not in err


@pytest.mark.parametrize("call, message", [
    (lambda con: queries.beta(con, Selection(strata="tial")), "--stratum: unknown stratum 'tial'"),
    (lambda con: queries.beta(con, Selection(site="middle")), "--site: unknown site 'middle'"),
    (lambda con: queries.beta(con, Selection(by=("optimizer", "colour"))), "--by: unknown factor 'colour'"),
    (lambda con: queries.beta(con, metric="renyi:4"), "--metric: unknown metric 'renyi:4'"),
    (lambda con: queries.matched(con, Selection(strata="TAIL")), "--stratum"),
    (lambda con: queries.delta(con, Selection(strata=("all", "rare"))), "--stratum: unknown stratum 'rare'"),
    (lambda con: queries.renyi(con, Selection(strata=""), ffn_mult=2), "--stratum"),
])
def test_the_library_validates_what_the_cli_used_to(db, call, message):
    """Library callers get the CLI's words, not an empty answer."""
    with store.connect(db, read_only=True) as con:
        with pytest.raises(QueryError, match=message.replace("(", r"\(")):
            call(con)


def test_steps_and_layers_are_ordered_as_numbers(tmp_path):
    """1, 200, 1000 — not 1, 1000, 200 — in dynamics; layers 2 before 10 in depth (CLI and API)."""
    from fastapi.testclient import TestClient

    from spectraldb.service import create_app

    db = tmp_path / "n.duckdb"
    for mult in (1, 2, 4):
        with planting(db) as plant:
            for opt in ("adamw", "muon"):
                plant(optimizer=opt, mult=mult, steps=1000, layers=12, measured=(1, 200, 1000),
                    rank_of=lambda D, s, l: D / 4)
    rows = json.loads(cli(db, "query", "dynamics", "--format", "json").stdout)
    assert [r["step"] for r in rows if r["optimizer"] == "AdamW"] == [1, 200, 1000]
    layers = [r["layer"] for r in json.loads(cli(db, "query", "depth", "--format", "json").stdout)
              if r["optimizer"] == "AdamW"]
    assert layers == list(range(12))
    api = TestClient(create_app(db), base_url="http://localhost").get("/api/dynamics").json()["rows"]
    assert [r["step"] for r in api if r["optimizer"] == "AdamW"] == [1, 200, 1000]


def test_labels_with_control_characters_are_refused_and_escaped_from_older_stores(tmp_path):
    from spectraldb.spec import load_spec

    for label in ("Adam\u200bW", "AdamW\x1b[2J", "Ad\nam", "\u202eWmadA"):
        spec = tmp_path / "s.yaml"
        spec.write_text(json.dumps({"optimizer": {"name": "adamw", "label": label}}))
        with pytest.raises(SpecError, match="optimizer.label: holds the invisible or control character"):
            load_spec(spec)
    db = tmp_path / "old.duckdb"
    with planting(db) as plant:
        for mult in (1, 2, 4):
            plant(mult=mult, rank_of=lambda D, s, l: D / 4)
    with duckdb.connect(str(db)) as con:  # an older store, written before labels were checked
        con.execute("UPDATE runs SET optimizer = 'Adam\x1b[2J\nFAKE LINE\u200b'")
    out = cli(db, "query", "beta").stdout
    assert "\x1b" not in out and "\u200b" not in out and "\\x1b[2J\\x0aFAKE LINE\\u200b" in out
    status = cli(db, "status", "--runs")
    assert "\x1b" not in status.output and "\\x1b" in status.stdout


@pytest.mark.slow
def test_specdb_sql_streams_rows_in_flat_memory(db, tmp_path):
    """Five million rows through `specdb sql --format csv` in a process whose address space is
    capped at 3 GiB (materialising them, as before, took several gigabytes)."""
    import resource
    import subprocess
    import sys

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, 3 * 1024**3))

    out = tmp_path / "rows.csv"
    with open(out, "w") as f:
        done = subprocess.run([sys.executable, "-m", "cli.main", "sql", "SELECT range AS i, 'x' || range AS s "
                               "FROM range(5000000)", "--db", str(db), "--format", "csv"], stdout=f,
                              stderr=subprocess.PIPE, text=True, preexec_fn=cap, timeout=600)
    assert done.returncode == 0, done.stderr
    with open(out) as f:
        assert sum(1 for _ in f) == 5_000_001


def test_a_predicate_quoted_back_stays_one_escaped_line(db, tmp_path):
    """An empty answer's note and a figure's refusal quote the predicate: a newline or a control
    character in one of its string literals is shown escaped, never as a second line or a bell."""
    where = "optimizer = 'a\nb\x07'"
    result = cli(db, "query", "beta", "--where", where)
    assert result.exit_code == 0 and result.stderr.endswith("where optimizer = 'a\\x0ab\\x07')\n"), result.stderr
    result = cli(db, "plot", "dynamics", "-o", str(tmp_path / "d.png"), "--where", where)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "'a\\x0ab\\x07'" in result.stderr
