"""Faults that happen in practice: no run lost, none duplicated, every error one clear line."""

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app
from spectraldb.run import executors
from tests.conftest import tiny_spec

pytestmark = pytest.mark.slow
runner = CliRunner()


def table_counts(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        runs = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
        per_run = con.execute("""SELECT r.run_id, (SELECT count(*) FROM evals e WHERE e.run_id = r.run_id),
                                        (SELECT count(*) FROM spectra s WHERE s.run_id = r.run_id)
                                 FROM runs r""").fetchall()
        orphans = con.execute("""SELECT (SELECT count(*) FROM evals WHERE run_id NOT IN (SELECT run_id FROM runs))
                                      + (SELECT count(*) FROM spectra WHERE run_id NOT IN (SELECT run_id FROM runs))
                                      + (SELECT count(*) FROM ranks WHERE run_id NOT IN (SELECT run_id FROM runs))""").fetchone()[0]
    finally:
        con.close()
    return runs, per_run, orphans


def dying_at(step: int, markers):
    """A training function whose first attempt of each run kills its own worker process at `step`
    (a marker file per run config remembers the attempt); later attempts train normally."""
    import hashlib

    def train(config, ds, progress=None, threads=None, checkpoint=None):
        from workers.train import run

        marker = markers / f"killed-{hashlib.sha1(repr(config).encode()).hexdigest()[:16]}"
        first = not marker.exists()
        marker.touch()

        def report(done, steps):
            if first and done == step:
                os._exit(1)  # the worker process dies mid-run
            if progress is not None:
                progress(done, steps)

        return run(config, ds, report, threads, checkpoint=checkpoint)

    return train


def kill_workers_at(monkeypatch, step, markers):
    """Ship `dying_at` to the Ray workers in place of the real training loop (by value: the
    workers need not import this test module)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(executors, "TRAIN", dying_at(step, markers))


def test_worker_killed_mid_run_is_retried_and_stored_once(tmp_path, corpus, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    kill_workers_at(monkeypatch, 4, markers)
    spec = tmp_path / "k.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "k.duckdb", "sweep:\n  ffn_mult: [1, 2]\n"))
    result = runner.invoke(app, ["run", str(spec), "--max-in-flight", "1"])
    assert result.exit_code == 0, result.output
    assert len(list(markers.iterdir())) == 2  # both runs' first attempts died
    runs, per_run, orphans = table_counts(tmp_path / "k.duckdb")
    assert sorted(runs.values()) == ["done", "done"] and orphans == 0
    assert all(n_evals == 3 and n_spectra == 3 * 2 * 2 * 4 for _, n_evals, n_spectra in per_run)


def test_retries_exhausted_is_a_failed_run(tmp_path, corpus, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    kill_workers_at(monkeypatch, 4, markers)
    spec = tmp_path / "k.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "k.duckdb", "", extra="resources: {max_retries: 0}\n"))
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 3, result.output
    runs, _, _ = table_counts(tmp_path / "k.duckdb")
    assert list(runs.values()) == ["failed"]


def test_driver_killed_mid_sweep_loses_nothing_and_resumes(tmp_path, corpus):
    db = tmp_path / "d.duckdb"
    spec = tmp_path / "d.yaml"
    spec.write_text(tiny_spec(corpus, db, "sweep:\n  seed: [0, 1, 2, 3, 4, 5]\n", steps=40).replace("every: 3", "every: 10"))
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "run", str(spec), "--executor", "inline"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    stored = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if db.exists():
            q = subprocess.run([sys.executable, "-m", "cli.main", "sql", "SELECT count(*) AS n FROM runs",
                                "--db", str(db), "--format", "csv"], capture_output=True, text=True)
            if q.returncode == 0 and int(q.stdout.split()[-1]) >= 2:
                stored = int(q.stdout.split()[-1])
                break
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    runs, per_run, orphans = table_counts(db)  # opens cleanly
    assert len(runs) >= stored and set(runs.values()) == {"done"} and orphans == 0
    assert all(n_evals == 5 for _, n_evals, _ in per_run)  # steps 1, 10, 20, 30, 40: whole runs only
    result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert result.exit_code == 0, result.output
    assert f"{6 - len(runs)} runs to do ({len(runs)} already in the store)" in result.stderr
    runs, per_run, orphans = table_counts(db)
    assert len(runs) == 6 and orphans == 0


def test_retry_failed_reruns_only_the_failed(tmp_path, corpus, monkeypatch):
    # the driver is told a GPU is visible (run refuses cuda without one), so the cuda run fails in its worker
    monkeypatch.setattr("spectraldb.run.preflight._local_gpus", lambda: 1)
    if __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    spec = tmp_path / "f.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "f.duckdb", "sweep:\n  zip:\n    - {seed: [0, 1], train.device: [cpu, cuda]}\n"))
    assert runner.invoke(app, ["run", str(spec), "--executor", "inline"]).exit_code == 3
    again = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert again.exit_code == 0 and "nothing to do" in again.stderr
    retry = runner.invoke(app, ["run", str(spec), "--executor", "inline", "--retry-failed"])
    assert retry.exit_code == 3 and "1 runs to do (1 already in the store)" in retry.stderr
    status = runner.invoke(app, ["status", "--db", str(tmp_path / "f.duckdb")])
    assert "failed" in status.stdout and "CUDA" in status.stderr


BAD_INPUTS = [
    ("model: {ffn_mult: -1}\n", "model.ffn_mult"),
    ("optimizer: {name: dion, rank_fraction: 1.5}\n", "optimizer.rank_fraction"),
    ("optimizer: {name: adamw, lr: -0.1}\n", "optimizer.lr"),
    ("train: {steps: 10}\nmeasure: {every: 50}\n", "measure.every"),
    ("sweep: {}\n", "sweep: no axes"),
    ("sweep:\n  zip:\n    - {seed: [1, 1], train.steps: [600, 600]}\n", "identical"),
    ("data: {corpus: /no/such/corpus}\n", "no such file or folder"),
    ("train: [1, 2\n", "malformed YAML"),
]


@pytest.mark.parametrize("text, message", BAD_INPUTS)
def test_bad_input_catalogue(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    result = runner.invoke(app, ["run", str(spec), "--executor", "inline", "--db", str(tmp_path / "s.duckdb")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "s.duckdb").exists()


@pytest.mark.parametrize("damage, message", [("magic", "bad magic"), ("truncate", "truncated")])
def test_bad_shards_through_the_cli(tmp_path, damage, message):
    import numpy as np

    from workers.data import write_shard

    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "a.bin", np.arange(1000) % 50000)
    raw = bytearray((folder / "a.bin").read_bytes())
    if damage == "magic":
        raw[:4] = (7).to_bytes(4, "little")
    else:
        raw = raw[:-200]
    (folder / "a.bin").write_bytes(bytes(raw))
    spec = tmp_path / "s.yaml"
    spec.write_text(f"data: {{corpus: {folder}}}\ntrain: {{steps: 10}}\nmeasure: {{every: 5}}\n")
    result = runner.invoke(app, ["run", str(spec), "--db", str(tmp_path / "s.duckdb")])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "s.duckdb").exists()


KEYS = st.sampled_from(["name", "store", "data", "model", "train", "optimizer", "measure", "resources", "sweep",
                        "steps", "lr", "ffn_mult", "n_head", "every", "corpus", "zip", "seed", "x", "model.ffn_mult"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.sampled_from(["adamw", "muon", "dion", "rope", "post", "all"]))
DOCS = st.recursive(SCALARS, lambda children: st.one_of(st.lists(children, max_size=4),
                                                          st.dictionaries(KEYS, children, max_size=5)), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(KEYS, DOCS, max_size=6))
def test_no_traceback_ever_reaches_the_user(tmp_path, doc):
    spec = tmp_path / "h.yaml"
    spec.write_text(yaml.safe_dump(doc, allow_unicode=True))
    result = runner.invoke(app, ["plan", str(spec), "--db", str(tmp_path / "none.duckdb"), "--format", "json"])
    assert result.exit_code in (0, 2), (doc, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (doc, result.exception)
    if result.exit_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    else:
        json.loads(result.stdout)


def test_status_shows_a_spec_and_the_runs_in_flight(tmp_path, corpus):
    db = tmp_path / "s.duckdb"
    spec = tmp_path / "s.yaml"
    # runs of a few seconds each (at 300 steps one took 0.6 s: shorter than a poll could count on)
    spec.write_text(tiny_spec(corpus, db, "sweep:\n  seed: [0, 1, 2]\n", steps=2000).replace("every: 3", "every: 1000"))
    before = runner.invoke(app, ["status", str(spec), "--format", "json"])
    assert before.exit_code == 0 and json.loads(before.stdout) == [{"status": "new", "runs": 3}]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "run", str(spec), "--executor", "inline"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, outputs = "", []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and "in flight" not in seen:
            time.sleep(0.3)
            if db.exists():
                q = runner.invoke(app, ["status", "--db", str(db)])  # in process: no interpreter start per poll
                seen = q.stderr
                outputs.append(f"[{q.exit_code}] {q.stderr.strip()}")
    finally:
        out, err = proc.communicate(timeout=300)
    assert "in flight" in seen and "step" in seen, (outputs, err[-2000:])
    assert not (tmp_path / "s.duckdb.progress.json").exists()  # removed when the sweep ends
    after = runner.invoke(app, ["status", str(spec), "--format", "json"])
    assert json.loads(after.stdout) == [{"status": "done", "runs": 3}]
