"""`specdb serve`: the JSON API through its test client and as a real server process."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.main import app as cli_app
from spectraldb import service
from spectraldb.errors import QueryError
from spectraldb.bounds import ReadLimits
from spectraldb.reader import Reader
from spectraldb.service import create_app, sql_body
from tests.conftest import planting, put, start_server, stop_server

runner = CliRunner()
SECRET = "TOP-SECRET-SERVICE"
LOCAL = "http://localhost"  # the Host the service answers on loopback (TestClient's default is refused)


def limits(**kw) -> ReadLimits:
    return ReadLimits(**{**ReadLimits.from_env().__dict__, **kw})


def sql(db, text, **kw) -> dict:
    bounds = limits(**kw)
    return json.loads(sql_body(Reader(db, bounds.time_s), text, bounds))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """AdamW (β 1) and Muon (β 0.5) at 4 widths, n_head 4 and 8, two seeds at n_head 4; one diverged run."""
    path = tmp_path_factory.mktemp("svc") / "s.duckdb"
    with planting(path) as plant:
        for n_head in (4, 8):
            for mult in (1, 2, 4, 8):
                for seed in ((0, 1) if n_head == 4 else (0,)):
                    plant(mult=mult, n_head=n_head, seed=seed, rank_of=lambda D, s, l, k=seed: D / 4 * (1 + 0.01 * k))
                    plant(optimizer="muon", mult=mult, n_head=n_head, seed=seed, ppl=51.0,
                        rank_of=lambda D, s, l, h=n_head: 2 * D ** (0.5 if h == 4 else 0.6))
        plant(mult=1, seed=7, status="diverged", rank_of=lambda D, s, l: D / 2)
    (path.parent / "secret.txt").write_text(SECRET)
    return path


@pytest.fixture(scope="module")
def client(db):
    return TestClient(create_app(db), base_url=LOCAL)


def cli_json(db, *args):
    result = runner.invoke(cli_app, [*args, "--db", str(db), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), [line for line in result.stderr.strip().splitlines() if line]


SAME_AS_CLI = [
    ("/api/beta", {}, ["query", "beta"]),
    ("/api/beta", {"stratum": "all", "by": "optimizer,n_head", "metric": "renyi:3"},
     ["query", "beta", "--by", "optimizer,n_head", "--metric", "renyi:3"]),
    ("/api/beta", {"layer": "each", "window": 1, "where": "n_head = 4"},
     ["query", "beta", "--layer", "each", "--window", "1", "--where", "n_head = 4"]),
    ("/api/dynamics", {"where": "n_head = 8"}, ["query", "dynamics", "--where", "n_head = 8"]),
    ("/api/depth", {"site": "pre"}, ["query", "depth", "--site", "pre"]),
    ("/api/matched", {"ppl_tol": 0.05, "by": "optimizer,n_head"},
     ["query", "matched", "--ppl-tol", "0.05", "--by", "optimizer,n_head"]),
    ("/api/delta", {"arch": "n_head", "reference": "4", "stratum": "all"},
     ["query", "delta", "--arch", "n_head", "--reference", "4", "--stratum", "all"]),
    ("/api/renyi", {"ffn_mult": 2}, ["query", "renyi", "--ffn-mult", "2"]),
    ("/api/trajectories", {"where": "n_head = 8", "stratum": "all"},
     ["query", "trajectories", "--where", "n_head = 8", "--stratum", "all"]),
]


def test_every_question_is_answered_alike_by_the_cli_the_api_and_the_notebook_reader(db, client):
    """One declaration per question (spectraldb/verbs.py): each answers the same rows everywhere."""
    import spectraldb
    from spectraldb.verbs import VERBS

    reader = spectraldb.open(db)
    for verb in VERBS:
        required = {o.name: 2.0 for o in verb.options if o.required}
        args = [a for name, v in required.items() for a in (f"--{name.replace('_', '-')}", str(v))]
        rows, _ = cli_json(db, "query", verb.name, *args)
        response = client.get(f"/api/{verb.name}", params=required)
        assert response.status_code == 200 and response.json()["rows"] == rows, verb.name
        assert json.loads(json.dumps(reader.__getattribute__(verb.name)(**required).rows, default=str)) == rows


@pytest.mark.parametrize("path, params, args", SAME_AS_CLI, ids=[f"{p}{i}" for i, (p, _, _) in enumerate(SAME_AS_CLI)])
def test_each_endpoint_returns_what_the_cli_prints(db, client, path, params, args):
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    rows, notes = cli_json(db, *args)
    assert response.json()["rows"] == rows and rows
    assert response.json()["notes"] == notes


def test_runs_run_spectrum_status(db, client):
    page = client.get("/api/runs", params={"limit": 5, "offset": 2, "status": "done"}).json()
    assert page["total"] == 24 and len(page["rows"]) == 5 and page["offset"] == 2
    assert client.get("/api/runs", params={"where": "n_head = 8"}).json()["total"] == 8
    rid = page["rows"][0]["run_id"]
    one = client.get(f"/api/runs/{rid}").json()
    assert one["run"]["run_id"] == rid and one["run"]["config"]["model"]["d_model"] == 32
    assert [e["step"] for e in one["evals"]] == [300] and len(one["ranks"]) == 3 * 2 * 2
    spec = client.get(f"/api/runs/{rid}/spectrum", params={"layer": 1, "site": "pre"}).json()
    assert spec["step"] == 300 and len(spec["eigenvalues"]) == spec["n_dim"]
    assert spec["eigenvalues"] == sorted(spec["eigenvalues"], reverse=True)
    status = client.get("/api/status").json()
    assert status["runs"] == {"done": 24, "diverged": 1} and status["in_flight"] == []
    assert client.get("/docs").status_code == 200 and "/api/beta" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("path, params, code, words", [
    ("/api/beta", {"stratum": "tial"}, 400, "--stratum: unknown stratum 'tial'"),
    ("/api/beta", {"site": "middle"}, 400, "--site: unknown site 'middle'"),
    ("/api/beta", {"by": "colour"}, 400, "--by: unknown factor 'colour'"),
    ("/api/beta", {"window": "abc"}, 422, "--window"),
    ("/api/beta", {"where": "error((SELECT content FROM read_text('secret.txt')))"}, 400, "subqueries are not allowed"),
    ("/api/beta", {"where": "TRUE) UNION SELECT run_id FROM spectra WHERE (TRUE"}, 400, "must be one predicate"),
    ("/api/beta", {"where": "CAST(corpus AS INTEGER) > 0"}, 400, "query failed"),
    ("/api/matched", {"metric": "bogus"}, 400, "--metric: unknown metric 'bogus'"),
    ("/api/renyi", {}, 422, "--ffn_mult"),
    ("/api/runs", {"limit": 0}, 422, "--limit"),
    ("/api/runs/nosuchrun", {}, 404, "no such run"),
    ("/api/runs/nosuchrun/spectrum", {}, 404, "no such run"),
])
def test_bad_parameters_get_one_line_in_the_clis_words(client, path, params, code, words):
    response = client.get(path, params=params)
    assert response.status_code == code, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words in detail and "\n" not in detail
    assert "Traceback" not in response.text and SECRET not in response.text and "sotu" not in response.text


def test_sql_is_one_read_only_select_with_limits(db, client):
    ok = client.post("/api/sql", json={"query": "SELECT optimizer, count(*) AS n FROM runs GROUP BY 1 ORDER BY 1"})
    assert ok.status_code == 200 and ok.json()["rows"] == [{"optimizer": "AdamW", "n": 13}, {"optimizer": "Muon", "n": 12}]
    for bad, words in [("DROP TABLE runs", "refused"), ("SELECT 1; SELECT 2", "expected one statement"),
                       (f"SELECT * FROM read_text('{db.parent / 'secret.txt'}')", "disabled"),
                       ("SET enable_external_access = true", "refused"), ("", "no statement")]:
        response = client.post("/api/sql", json={"query": bad})
        assert response.status_code == 400 and words in response.json()["detail"], (bad, response.text)
        assert SECRET not in response.text
    capped = sql(db, "SELECT * FROM range(100)", rows=10)
    assert len(capped["rows"]) == 10 and capped["notes"] == [
        "row cap reached: the first 10 rows are shown (SPECDB_SQL_ROWS raises it)"]
    t0 = time.monotonic()
    with pytest.raises(QueryError, match="time limit of 0.5 s"):
        sql(db, "SELECT count(*) FROM range(100000000000) a", time_s=0.5)
    assert time.monotonic() - t0 < 10


def test_a_token_guards_every_request(db):
    guarded = TestClient(create_app(db, token="s3cret-token"), base_url=LOCAL)
    assert guarded.get("/api/status").status_code == 401
    assert guarded.get("/api/status", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    assert guarded.get("/api/status", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def test_serving_beyond_loopback_needs_a_token(db):
    result = runner.invoke(cli_app, ["serve", "--db", str(db), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "needs --token" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(cli_app, ["serve", "--db", str(db.parent / "none.duckdb")])
    assert result.exit_code == 2 and "no such store" in result.stderr


def get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=60) as response:
        return response.status, json.loads(response.read())


@pytest.mark.slow
def test_a_real_server_process_answers_over_http_and_waits_out_a_commit(db, client):
    proc, base = start_server(db, "--token", "token-for-test")
    try:
        with pytest.raises(urllib.error.HTTPError) as denied:
            get(f"{base}/api/beta")
        assert denied.value.code == 401
        code, body = get(f"{base}/api/beta?stratum=all", "token-for-test")
        assert code == 200 and body == client.get("/api/beta").json()
        # a writer holds the file for 2 s (as a driver's commit would): the request waits, then answers
        writer = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); "
                                   "print('open', flush=True); time.sleep(2)"], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "open"
        t0 = time.monotonic()
        code, body = get(f"{base}/api/beta", "token-for-test")
        writer.wait()
        assert code == 200 and body["rows"] and time.monotonic() - t0 > 0.5
    finally:
        err = stop_server(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_status_answers_at_once_while_a_commit_holds_the_store(tmp_path):
    db = tmp_path / "l.duckdb"
    put(db, mult=1, rank_of=lambda D, s, l: D / 4)
    client = TestClient(create_app(db), base_url=LOCAL)
    before = client.get("/api/status").json()
    assert before["runs"] == {"done": 1} and before["runs_as_of"] <= before["updated"]
    writer = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); "
                               "print('open', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        t0 = time.monotonic()
        during = client.get("/api/status").json()
        assert time.monotonic() - t0 < 1.0  # no wait for the commit
        assert during["runs"] == {"done": 1} and during["runs_as_of"] == before["runs_as_of"]
    finally:
        writer.kill()  # the lock goes with the process
        writer.wait()
    put(db, mult=2, rank_of=lambda D, s, l: D / 4)
    after = client.get("/api/status").json()
    assert after["runs"] == {"done": 2} and after["runs_as_of"] > before["runs_as_of"]


def test_answers_are_remembered_until_the_store_changes(tmp_path):
    db = tmp_path / "c.duckdb"
    with planting(db) as plant:
        for mult in (1, 2, 4):
            plant(mult=mult, rank_of=lambda D, s, l: D / 4)
    client = TestClient(create_app(db, token="cache-token"), base_url=LOCAL)
    auth = {"Authorization": "Bearer cache-token"}
    first = client.get("/api/beta", headers=auth)
    again = client.get("/api/beta", headers=auth)
    assert again.headers.get("x-specdb-cache") == "hit" and again.json() == first.json()
    assert client.get("/api/beta").status_code == 401  # the token is checked before any remembered answer
    other = client.get("/api/beta", params={"stratum": "tail"}, headers=auth)
    assert other.headers.get("x-specdb-cache") is None  # other parameters, another answer
    put(db, mult=8, rank_of=lambda D, s, l: D / 4)  # a commit
    after = client.get("/api/beta", headers={**auth, "Cache-Control": "no-cache"})  # the current answer, now
    assert after.headers.get("x-specdb-cache") is None and after.json()["rows"][0]["n_widths"] == 4
    assert first.json()["rows"][0]["n_widths"] == 3


def test_after_a_commit_the_previous_answer_is_served_while_one_refresh_computes(tmp_path):
    db = tmp_path / "s.duckdb"
    with planting(db) as plant:
        for mult in (1, 2, 4):
            plant(mult=mult, rank_of=lambda D, s, l: D / 4)
    with TestClient(create_app(db), base_url=LOCAL) as client:  # one event loop for the background refresh
        assert client.get("/api/beta").json()["rows"][0]["n_widths"] == 3
        put(db, mult=8, rank_of=lambda D, s, l: D / 4)  # a commit
        stale = client.get("/api/beta")
        assert stale.headers["x-specdb-cache"] == "stale" and int(stale.headers["age"]) <= service.cache.MAX_STALE_S
        assert stale.json()["rows"][0]["n_widths"] == 3
        for _ in range(100):  # the refresh lands without any client waiting for it
            fresh = client.get("/api/beta")
            if fresh.headers["x-specdb-cache"] == "hit":
                break
            time.sleep(0.05)
        assert fresh.headers["x-specdb-cache"] == "hit" and fresh.json()["rows"][0]["n_widths"] == 4


def test_an_answer_older_than_the_staleness_bound_is_recomputed_before_it_is_served(tmp_path, monkeypatch):
    db = tmp_path / "o.duckdb"
    with planting(db) as plant:
        for mult in (1, 2, 4):
            plant(mult=mult, rank_of=lambda D, s, l: D / 4)
    monkeypatch.setattr(service.cache, "MAX_STALE_S", 0.0)
    with TestClient(create_app(db), base_url=LOCAL) as client:
        client.get("/api/beta")
        put(db, mult=8, rank_of=lambda D, s, l: D / 4)
        time.sleep(0.01)
        after = client.get("/api/beta")
        assert after.headers.get("x-specdb-cache") is None and after.json()["rows"][0]["n_widths"] == 4
