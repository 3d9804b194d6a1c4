"""No trained run lost, none trained twice: concurrent drivers, long readers, a full disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb import store
from spectraldb.run import sink as sinks
from spectraldb.run import sweep
from spectraldb.errors import StoreError
from spectraldb.run.progress import PlainReporter
from spectraldb.sidecar.progress import SidecarReporter
from spectraldb.spec import RunSpec, load_spec
from spectraldb.sidecar.lock import WriterLock
from spectraldb.sidecar.spool import Spool
from tests.builders import decaying
from tests.conftest import start_sweep, tiny_spec

runner = CliRunner()


def a_run(**train):
    return RunSpec.model_validate({"model": {"ffn_mult": 1, "d_model": 32}, "train": {"steps": 30, **train},
                                   "measure": {"every": 10, "last_k": 2}})


def create(db):
    with store.connect(db):
        pass


def counts(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return dict(con.execute("SELECT run_id, status FROM runs").fetchall()), \
            con.execute("SELECT count(*) FROM evals").fetchone()[0]
    finally:
        con.close()


def test_a_done_run_is_never_replaced_by_a_failed_or_diverged_one(tmp_path):
    db, run = tmp_path / "s.duckdb", a_run()
    assert store.write_run(db, run, decaying("done"), {}) == "done"
    for status in ("failed", "diverged"):
        assert store.write_run(db, run, decaying(status, n_steps=1), {}) == "done"
    assert counts(db) == ({run.run_id: "done"}, 3)
    assert store.write_run(db, run, decaying("done", n_steps=2), {}) == "done"  # done replaces done
    assert counts(db)[1] == 2


def test_one_writer_per_store(tmp_path):
    db = tmp_path / "s.duckdb"
    with WriterLock(db):
        with pytest.raises(StoreError, match=rf"another `specdb run` is writing this store \(pid {os.getpid()}"):
            with WriterLock(db):
                pass
    assert not Path(f"{db}.lock").exists()  # released and removed
    with WriterLock(db):  # and can be taken again
        pass


@pytest.mark.slow  # two real drivers, one of them training a sweep
def test_a_second_driver_is_refused_and_nothing_is_trained_twice(tmp_path, corpus):
    first, db, spec = start_sweep(tmp_path, corpus, steps=60, every=20)
    try:
        second = subprocess.run([sys.executable, "-m", "cli.main", "run", str(spec), "--executor", "inline"],
                                capture_output=True, text=True, timeout=120)
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2 and f"(pid {first.pid} on" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert err.count("done ") == 3  # three runs, each trained once, by the first driver
    assert set(counts(db)[0].values()) == {"done"} and len(counts(db)[0]) == 3


def test_spool_round_trip_is_exact(tmp_path):
    run, res = a_run(seed=7), decaying()
    spool = Spool(tmp_path / "s.duckdb")
    path = spool.put(run.run_id, run.config(), res, {"host": "h"}, "spec", 300)
    back = Spool.load(path)
    assert back["config"] == run.config() and back["spec_name"] == "spec" and back["vocab_size"] == 300
    assert RunSpec.model_validate(back["config"]).run_id == run.run_id
    assert back["result"].evals == res.evals and back["result"].status == res.status
    for a, b in zip(back["result"].spectra, res.spectra):
        assert np.array_equal(a.eigenvalues, b.eigenvalues) and a.min_eigenvalue == b.min_eigenvalue
    assert not list(spool.dir.glob(".*.tmp"))


def seeds_sweep(tmp_path, corpus, n):
    """A tiny spec of n seeds and its (created, empty) store."""
    db, spec = tmp_path / "s.duckdb", tmp_path / "s.yaml"
    spec.write_text(tiny_spec(corpus, db, f"sweep:\n  seed: {list(range(n))}\n"))
    create(db)
    return db, spec


def hold_reader(db, seconds):
    """Another process with the store open read-only (as `duckdb specdb.duckdb` would) for a while."""
    code = (f"import duckdb, time; c = duckdb.connect({str(db)!r}, read_only=True); "
            f"print('open', flush=True); time.sleep({seconds})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


@pytest.mark.slow
def test_a_long_reader_delays_commits_but_never_aborts_the_sweep(tmp_path, corpus, monkeypatch):
    db, spec = seeds_sweep(tmp_path, corpus, 3)
    monkeypatch.setattr(sinks, "COMMIT_WAIT_S", 0.3)
    readers = []
    prepare = sweep.prepare_data

    def prepare_then_open_a_reader(*a, **k):  # the reader arrives once training is about to start
        out = prepare(*a, **k)
        readers.append(hold_reader(db, 4))  # longer than a commit waits, shorter than the final wait
        return out

    monkeypatch.setattr(sweep, "prepare_data", prepare_then_open_a_reader)
    try:
        result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    finally:
        readers[0].wait()
    assert result.exit_code == 0, result.output
    assert "not committed yet" in result.stderr and "kept in" in result.stderr
    assert counts(db)[0] and set(counts(db)[0].values()) == {"done"} and len(counts(db)[0]) == 3
    assert not Path(f"{db}.spool").exists()


@pytest.mark.slow
def test_a_spool_left_behind_is_committed_first_and_not_retrained(tmp_path, corpus, monkeypatch):
    db, spec = seeds_sweep(tmp_path, corpus, 2)
    monkeypatch.setattr(sinks, "COMMIT_WAIT_S", 0.2)
    monkeypatch.setattr(sinks, "FINAL_WAIT_S", 0.5)
    sweep.prepare_data(load_spec(spec)[0].runs)  # the dataset cache is warm before the reader comes
    reader = hold_reader(db, 60)
    try:
        result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
        assert result.exit_code == 1 and "wait in" in result.stderr, result.output
        assert len(list(Path(f"{db}.spool").glob("*.npz"))) == 2
        plan = runner.invoke(app, ["plan", str(spec), "--format", "json"])
        assert [r["status"] for r in json.loads(plan.stdout)] == ["spooled", "spooled"]
        status = runner.invoke(app, ["status", "--db", str(tmp_path / "other.duckdb")])
        assert status.exit_code == 2
    finally:
        reader.kill()
        reader.wait()
    status = runner.invoke(app, ["status", "--db", str(db)])
    assert "2 finished run(s) waiting" in status.stderr
    again = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert again.exit_code == 0, again.output
    assert "committed 2 finished run(s)" in again.stderr and "nothing to do" in again.stderr
    assert set(counts(db)[0].values()) == {"done"} and len(counts(db)[0]) == 2
    assert not Path(f"{db}.spool").exists()


def test_a_full_disk_during_a_commit_keeps_the_result(tmp_path, monkeypatch):
    """The commit fails with the disk's own error; the result goes to the spool; nothing hides it."""
    db, run = tmp_path / "s.duckdb", a_run()
    create(db)

    def full(*a, **k):
        raise duckdb.TransactionException("Failed to commit: Could not write file: No space left on device")

    monkeypatch.setattr(store, "write_run", full)
    lines = []

    class Capture(PlainReporter):
        def _print(self, text):
            lines.append(text)

    plan = type("P", (), {"spec_name": "t"})()
    sink = sinks.Sink(plan, db, {}, Capture(), sweep.SweepResult(1, 0), Spool(db))
    sink.put(run, decaying(), 4096)
    assert "No space left on device" in lines[-1] and "kept in" in lines[-1]
    monkeypatch.undo()
    assert sink.finish() == []
    assert counts(db)[0] == {run.run_id: "done"}


def test_rollback_after_an_aborted_transaction_does_not_hide_the_cause(tmp_path, monkeypatch):
    """A commit that fails mid-transaction (DuckDB has aborted it, so ROLLBACK itself errors)
    raises its own error, and the store still holds what it held before."""
    from spectraldb.store import write as store_write

    db, run = tmp_path / "s.duckdb", a_run()
    assert store.write_run(db, run, decaying("failed", n_steps=1), {}) == "failed"
    real = store_write._insert

    def abort_then_fail(con, table, batch):
        if table == "spectra":  # a constraint violation aborts the transaction: ROLLBACK then errors too
            con.execute("INSERT INTO runs (run_id) VALUES (?)", [run.run_id])
        real(con, table, batch)

    monkeypatch.setattr(store_write, "_insert", abort_then_fail)
    with pytest.raises(duckdb.ConstraintException, match="NOT NULL constraint failed"):
        store.write_run(db, run, decaying("done"), {})
    assert counts(db) == ({run.run_id: "failed"}, 1)  # the earlier rows, untouched


@pytest.mark.slow
def test_a_real_full_disk(tmp_path, corpus):
    """A 16 MiB tmpfs holds the store; a filler takes the rest; the sweep's commits fail with
    ENOSPC (the spool too, so results wait in memory); freeing space lets the sweep finish."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        db, spec = mnt / "s.duckdb", tmp_path / "s.yaml"
        spec.write_text(tiny_spec(corpus, db, "sweep:\n  seed: [0, 1]\n"))
        create(db)
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 4096))
        env = {**os.environ, "SPECDB_SPOOL_WAIT": "60"}
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "run", str(spec), "--executor", "inline"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        seen = ""
        while "waiting to be committed" not in seen and proc.poll() is None:
            seen += proc.stderr.readline()
        assert "No space left on device" in seen and "Traceback" not in seen, seen
        (mnt / "filler").unlink()
        _, rest = proc.communicate(timeout=120)
        assert proc.returncode == 0, seen + rest
        assert set(counts(db)[0].values()) == {"done"} and len(counts(db)[0]) == 2
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_the_progress_sidecar_tolerates_a_full_disk(tmp_path, monkeypatch):
    """The sidecar's own write (write_atomically: a fresh file, written, renamed) hits ENOSPC; the
    sweep's reporter carries on and leaves no temporary file. The fault is counted, so this test
    fails if the write ever takes another path."""
    rep = SidecarReporter(PlainReporter(open(os.devnull, "w")), tmp_path / "s.duckdb")
    real, fired = os.fdopen, []

    class Full:
        def __init__(self, fd, mode):
            self.f = real(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            fired.append(len(data))
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", Full)
    rep.start(1, 0)
    rep.finish("r", "AdamW", "done", 1.0)  # no exception
    monkeypatch.undo()
    assert len(fired) == 2  # both writes met the full disk
    assert not list(tmp_path.iterdir())  # no half-written temporary file left behind
    rep.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value, seconds", [("12", 12.0), ("abc", 300.0), ("nan", 300.0), ("-1", 300.0),
                                            ("inf", 300.0), ("", 300.0)])
def test_the_spool_wait_from_the_environment_is_checked(monkeypatch, value, seconds):
    monkeypatch.setenv("SPECDB_SPOOL_WAIT", value)
    assert sinks._env_seconds("SPECDB_SPOOL_WAIT", 300.0) == seconds
