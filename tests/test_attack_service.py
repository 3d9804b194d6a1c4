"""The service attacked as a browser and a hostile neighbour would (issue 21): unbounded reads,
DNS rebinding, disclosure, statements that write, a token a browser cannot use. The attacks that
could exhaust memory run in a real server process whose own cap (SPECDB_PROCESS_MEMORY_MB) is
under test, inside an outer address-space limit, so they cannot take down the test machine."""

import json
import os
import resource
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.main import app as cli_app
from spectraldb import store
from spectraldb.service import create_app
from spectraldb.spec import RunSpec
from tests.builders import result
from tests.conftest import stop_server, start_server as serve, plant_widths

runner = CliRunner()
LOCAL = "http://localhost"
OUTER_LIMIT = 6 * 1024**3
HUGE_WHERE = "length(repeat(run_id, 100000000)) > 0"
SLOW_WHERE = "list_reduce(range(0, 10000000), lambda a, b: a + b) > 0"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("svcattack") / "a.duckdb"
    plant_widths(path)
    run = RunSpec.model_validate({"model": {"d_model": 32, "ffn_mult": 8}, "train": {"steps": 300}})
    trace = (f'Traceback (most recent call last):\n  File "{path.parent}/site-packages/workers/train.py", line 9\n'
             f"RuntimeError: out of memory reading {path.parent}/corpus.txt")
    store.write_run(path, run, result("failed", error=trace), {})
    return path


@pytest.fixture(scope="module")
def client(db):
    return TestClient(create_app(db), base_url=LOCAL)


def test_dns_rebinding_gets_400_and_nothing_else(db, client):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost:x", ""):
        response = client.get("/api/runs", headers={"Host": host})
        assert response.status_code == 400 and "Host" in response.json()["detail"], host
        assert "run_id" not in response.text
    response = client.post("/api/sql", json={"query": "SELECT * FROM runs"}, headers={"Host": "evil.example"})
    assert response.status_code == 400 and "run_id" not in response.text
    for host in ("localhost", "localhost:8000", "127.0.0.1:9", "[::1]:8000", "LOCALHOST"):
        assert client.get("/api/status", headers={"Host": host}).status_code == 200, host
    named = TestClient(create_app(db, allowed_hosts=["lab-box"]), base_url="http://lab-box:8000")
    assert named.get("/api/status").status_code == 200
    assert named.get("/api/status", headers={"Host": "other-box"}).status_code == 400


def test_explain_analyze_copy_is_refused_everywhere_and_writes_nothing(db, client, tmp_path):
    target = f"{db}.tmp/out.csv"
    for text in (f"EXPLAIN ANALYZE COPY (SELECT * FROM range(1000)) TO '{target}'",
                 f"EXPLAIN COPY runs TO '{target}'", "EXPLAIN ANALYZE INSERT INTO runs SELECT * FROM runs",
                 "/* hi */ EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'", "EXPLAIN (FORMAT json) SELECT 1",
                 "CALL pragma_version()", "PRAGMA version", "ATTACH 'x.duckdb'", "CHECKPOINT"):
        response = client.post("/api/sql", json={"query": text})
        assert response.status_code == 400, (text, response.text)
        result = runner.invoke(cli_app, ["sql", text, "--db", str(db)])
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, (text, result.output)
    assert not os.path.exists(target) and not os.path.exists("x.csv")
    ok = client.post("/api/sql", json={"query": "EXPLAIN ANALYZE SELECT count(*) FROM runs"})
    assert ok.status_code == 200 and ok.json()["rows"]


def test_duplicate_column_names_are_kept_apart(db, client):
    body = client.post("/api/sql", json={"query": "SELECT 1 AS a, 2 AS a, 3 AS a_2"}).json()
    assert body["columns"] == ["a", "a_2", "a_2_2"] and body["rows"] == [{"a": 1, "a_2": 2, "a_2_2": 3}]
    result = runner.invoke(cli_app, ["sql", "SELECT 1 AS a, 2 AS a", "--db", str(db), "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == [{"a": 1, "a_2": 2}]


def test_a_huge_answer_is_cut_at_the_byte_cap_with_a_note(db, monkeypatch):
    monkeypatch.setenv("SPECDB_RESPONSE_MB", "1")
    capped = TestClient(create_app(db), base_url=LOCAL)
    t0 = time.monotonic()
    response = capped.post("/api/sql", json={"query": "SELECT repeat('x', 200000) AS s FROM range(10000)"})
    assert response.status_code == 200 and len(response.content) < 2 * 1024**2
    assert any("byte cap reached" in n for n in response.json()["notes"])
    assert time.monotonic() - t0 < 30


@pytest.mark.slow  # waits out a time limit on purpose
def test_encoding_counts_against_the_time_limit(db, monkeypatch):
    monkeypatch.setenv("SPECDB_READ_TIME_S", "1")
    monkeypatch.setenv("SPECDB_RESPONSE_MB", "4096")
    monkeypatch.setenv("SPECDB_SQL_ROWS", "1000000")
    slow = TestClient(create_app(db), base_url=LOCAL)
    t0 = time.monotonic()
    response = slow.post("/api/sql", json={"query": "SELECT range(0, 3000) AS r FROM range(10000)"})
    assert response.status_code == 400 and "time limit of 1 s" in response.json()["detail"]
    assert time.monotonic() - t0 < 10


@pytest.mark.slow
def test_a_slow_predicate_stops_at_the_time_limit(db, monkeypatch):
    monkeypatch.setenv("SPECDB_READ_TIME_S", "1")
    slow = TestClient(create_app(db), base_url=LOCAL)
    t0 = time.monotonic()
    response = slow.get("/api/beta", params={"where": SLOW_WHERE})
    assert response.status_code == 400 and "time limit" in response.json()["detail"]
    assert time.monotonic() - t0 < 20
    result = runner.invoke(cli_app, ["query", "beta", "--where", SLOW_WHERE, "--db", str(db)])
    assert result.exit_code == 2 and "time limit of 1 s" in result.stderr


def test_bad_windows_and_tolerances_are_refused_in_one_line(db, client):
    for path, params, words in [("/api/beta", {"window": 0}, "--window"), ("/api/matched", {"ppl_tol": "nan"}, "--ppl-tol"),
                                ("/api/matched", {"ppl_tol": "inf"}, "--ppl-tol"),
                                ("/api/matched", {"min_dbeta": -1}, "--min-dbeta")]:
        response = client.get(path, params=params)
        assert response.status_code == 400 and words in response.json()["detail"], response.text


def test_a_failed_runs_page_and_errors_show_no_paths(db, client, tmp_path):
    rid = client.get("/api/runs", params={"status": "failed"}).json()["rows"][0]["run_id"]
    page = client.get(f"/api/runs/{rid}").json()["run"]
    assert page["error"] == "RuntimeError: out of memory reading corpus.txt"
    assert str(db.parent) not in json.dumps(page) and "Traceback" not in json.dumps(page)
    gone = TestClient(create_app(tmp_path / "gone.duckdb"), base_url=LOCAL)
    response = gone.get("/api/beta")
    assert response.status_code == 503 and str(tmp_path) not in response.text and "gone.duckdb" in response.text
    bad = client.post("/api/sql", json={"query": "SELECT CAST(error AS INTEGER) FROM runs WHERE error IS NOT NULL"})
    assert bad.status_code == 400 and str(db.parent) not in bad.text and "out of memory reading" not in bad.text


def test_pages_allow_only_the_servers_own_scripts_and_docs_work_offline(client):
    for path in ("/", "/docs", "/api/status"):
        csp = client.get(path).headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    page = client.get("/").text
    assert "<script>" not in page and '<script src="/static/dashboard.js">' in page
    docs = client.get("/docs").text
    assert "://" not in docs and "/static/swagger-ui-bundle.js" in docs and "<script>" not in docs
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "docs.js", "dashboard.js", "plotly.min.js"):
        assert client.get(f"/static/{asset}").status_code == 200, asset
    assert client.get("/static/..%2Fservice.py").status_code == 404


def test_a_token_link_lets_a_browser_in_once(db):
    guarded = TestClient(create_app(db, token="browser-token-1"), base_url=LOCAL)
    assert guarded.get("/").status_code == 401
    assert guarded.get("/?token=wrong-token").status_code == 401
    opened = guarded.get("/?token=browser-token-1", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/"
    cookie = opened.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert guarded.get("/api/status").status_code == 200  # the cookie, from now on
    assert guarded.get("/api/beta").status_code == 200
    fresh = TestClient(create_app(db, token="browser-token-1"), base_url=LOCAL)
    assert fresh.get("/api/status?token=browser-token-1").status_code == 401  # only the page link sets it


def test_a_malformed_or_stale_progress_file_is_ignored_with_a_note(db, client):
    progress = db.with_name(db.name + ".progress.json")
    try:
        for content in (b"{not json", b"[]", b'{"pid": "x", "runs": {}}', b"\xff\xfe" * 10,
                        json.dumps({"pid": 1, "runs": {"phantom": {"label": "AdamW", "step": 1, "steps": 9}}}).encode(),
                        json.dumps({"pid": -1, "runs": {"phantom": {"label": "AdamW", "step": 1, "steps": 9}}}).encode(),
                        json.dumps({"pid": os.getpid(), "runs": {"p": {"label": "x", "step": 1, "steps": 2}}}).encode()):
            progress.write_bytes(content)
            body = client.get("/api/status", headers={"Cache-Control": "no-cache"})
            assert body.status_code == 200 and body.json()["in_flight"] == [], content
            assert body.json()["notes"] and "ignored" in body.json()["notes"][0]
            result = runner.invoke(cli_app, ["status", "--db", str(db)])
            assert result.exit_code == 0 and "ignored" in result.stderr and "in flight" not in result.stderr
            assert "Traceback" not in result.output
    finally:
        progress.unlink(missing_ok=True)


# ------------------------------------------------------------------ a real server process


def _outer_limit():
    resource.setrlimit(resource.RLIMIT_AS, (OUTER_LIMIT, OUTER_LIMIT))


def start_server(db, *extra, env=None):
    return serve(db, *extra, env=env, preexec_fn=_outer_limit)


def fetch(url, data=None, headers=None, timeout=60):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.slow
def test_memory_attacks_fail_alone_and_the_server_lives(db):
    proc, base = start_server(db, env={"SPECDB_PROCESS_MEMORY_MB": "1536", "SPECDB_READ_TIME_S": "20"})
    try:
        code, body = fetch(base + "/api/beta?where=" + urllib.parse.quote(HUGE_WHERE))
        assert code == 400 and b"memory" in body, body
        code, body = fetch(base + "/api/sql", json.dumps({"query": "SELECT length(repeat('x', 3000000000))"}).encode())
        assert code == 400 and b"memory" in body, body
        code, body = fetch(base + "/api/status")
        assert code == 200 and json.loads(body)["runs"]["done"] == 3
    finally:
        err = stop_server(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.mark.slow
def test_heavy_requests_never_hold_up_status(db):
    proc, base = start_server(db, env={"SPECDB_READ_TIME_S": "3", "SPECDB_HEAVY_REQUESTS": "2"})
    slow = json.dumps({"query": "SELECT count(*) FROM range(100000000000)"}).encode()
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(fetch(base + "/api/sql", slow)[0])) for _ in range(24)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        waits = []
        for _ in range(10):
            t0 = time.monotonic()
            assert fetch(base + "/api/status")[0] == 200
            waits.append(time.monotonic() - t0)
            time.sleep(0.1)
        for t in threads:
            t.join(timeout=120)
    finally:
        err = stop_server(proc)
    assert max(waits) < 1.0, waits
    assert len(answers) == 24 and set(answers) <= {400, 503}, answers  # stopped at the limit, or told busy
    assert "Traceback" not in err


@pytest.mark.slow
def test_the_token_never_reaches_the_servers_output(db):
    import http.client

    proc, base = start_server(db, "--token", "never-in-logs-123")
    try:
        conn = http.client.HTTPConnection(base.split("//")[1], timeout=30)
        conn.request("GET", "/?token=never-in-logs-123")
        opened = conn.getresponse()
        opened.read()
        assert opened.status == 303 and "specdb_token=" in opened.getheader("set-cookie")
        conn.request("GET", "/", headers={"Cookie": opened.getheader("set-cookie").split(";")[0]})
        page = conn.getresponse()
        assert page.status == 200 and b"dashboard.js" in page.read()
        conn.request("GET", "/?token=wrong-token-xyz")
        conn.getresponse().read()
    finally:
        err = stop_server(proc)
    assert "never-in-logs-123" not in err and "wrong-token-xyz" not in err


def test_serving_on_all_interfaces_needs_the_names_clients_use(db):
    result = runner.invoke(cli_app, ["serve", "--db", str(db), "--host", "0.0.0.0", "--token", "long-enough-token"])
    assert result.exit_code == 2 and "--allowed-host" in result.stderr
    result = runner.invoke(cli_app, ["serve", "--db", str(db), "--host", "0.0.0.0", "--token", "long-enough-token",
                                     "--allowed-host", "bad name/x"])
    assert result.exit_code == 2 and "not a host name" in result.stderr


def test_readers_spill_into_a_private_folder_away_from_the_store(db, client):
    import stat

    rows = client.post("/api/sql", json={"query": "SELECT current_setting('temp_directory') AS t, "
                                                  "current_setting('memory_limit') AS m"}).json()["rows"]
    folder = rows[0]["t"]
    assert not folder.startswith(str(db)) and os.path.isdir(folder) and rows[0]["m"] == "1.0 GiB"
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    refused = client.post("/api/sql", json={"query": "SET temp_directory = '/tmp'"})
    assert refused.status_code == 400
