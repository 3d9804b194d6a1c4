"""The files beside a store attacked as on a shared disk (issue 21): planted symlinks, a store
reached by two paths, spool entries that are damaged, foreign or not files at all."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from contract.records import RunResult
from spectraldb import store
from spectraldb.errors import StoreError
from spectraldb.run.progress import PlainReporter
from spectraldb.sidecar.progress import SidecarReporter
from spectraldb.spec import load_spec
from spectraldb.sidecar.lock import WriterLock
from spectraldb.sidecar.spool import Spool
from tests.conftest import tiny_spec

runner = CliRunner()
SEEDS = "sweep:\n  seed: [0, 1, 2, 3, 4, 5, 6, 7, 8]\n"


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    db = tmp_path / "s.duckdb"
    os.symlink(victim, f"{db}.lock")
    with pytest.raises(StoreError, match="symlink"):
        with WriterLock(db):
            pass
    assert victim.read_text() == "precious"


@pytest.mark.slow  # waits out the lock's retries on purpose
def test_one_writer_per_store_file_whatever_path_names_it(tmp_path):
    db = tmp_path / "real" / "s.duckdb"
    db.parent.mkdir()
    os.symlink(db.parent, tmp_path / "alias")
    (tmp_path / "other").mkdir()
    os.symlink(db, tmp_path / "other" / "link.duckdb")  # the store file itself, by a symlinked name
    with WriterLock(db):
        for path in (tmp_path / "alias" / "s.duckdb", tmp_path / "other" / "link.duckdb"):
            with pytest.raises(StoreError, match="another `specdb run` is writing"):
                with WriterLock(path):
                    pass


def test_progress_and_spool_writes_never_follow_a_symlink(tmp_path):
    db = tmp_path / "s.duckdb"
    victims = []
    for name in (f"{db}.progress.json", f"{db}.progress.tmp", f"{db}.spool/.abc.tmp"):
        victim = tmp_path / f"victim{len(victims)}"
        victim.write_text("precious")
        os.makedirs(os.path.dirname(name), exist_ok=True)
        os.symlink(victim, name)
        victims.append(victim)
    reporter = SidecarReporter(PlainReporter(io.StringIO()), db)
    reporter.start(1, 0)
    reporter.step("abc", "AdamW", 1, 2)
    Spool(db).put("abc", {}, RunResult.failed("boom"), {}, "")
    reporter.close()
    assert all(v.read_text() == "precious" for v in victims)


def _entries(tmp_path, corpus, runs):
    """One damaged spool entry per run of the plan: every way a file can be bad."""
    spool = Spool(tmp_path / "s.duckdb")
    spool.dir.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    np.savez(good, meta=np.frombuffer(json.dumps([1, 2]).encode(), dtype=np.uint8))
    nested = io.BytesIO()
    np.savez(nested, meta=np.frombuffer(("[" * 100000 + "]" * 100000).encode(), dtype=np.uint8))
    crc = bytearray(_valid_entry(runs[0]))
    crc[len(crc) // 2] ^= 0xFF
    kinds = {"bad zip": b"PK\x03\x04 not really a zip", "bad CRC": bytes(crc), "a JSON list": good.getvalue(),
             "deeply nested JSON": nested.getvalue(), "an empty file": b""}
    made = {}
    for (kind, data), run in zip(kinds.items(), runs):
        (spool.dir / f"{run.run_id}.npz").write_bytes(data)
        made[run.run_id] = kind
    fifo, link, foreign, wrong = runs[len(kinds):len(kinds) + 4]
    os.mkfifo(spool.dir / f"{fifo.run_id}.npz")
    made[fifo.run_id] = "a FIFO"
    (tmp_path / "elsewhere.npz").write_bytes(_valid_entry(link))
    os.symlink(tmp_path / "elsewhere.npz", spool.dir / f"{link.run_id}.npz")
    made[link.run_id] = "a symlink"
    (spool.dir / f"{foreign.run_id}.npz").write_bytes(_valid_entry(wrong))  # named after one run, holding another
    made[foreign.run_id] = "another run's result"
    return spool, made, wrong


def _valid_entry(run) -> bytes:
    result = {"status": "done", "started_at": 0.0, "finished_at": 1.0, "evals": [
        {"step": 6, "train_loss": 0.0, "val_loss": 0.0, "val_ppl": 1.0}], "spectra": []}
    meta = {"config": run.config(), "result": result, "provenance": {}, "spec_name": "tiny"}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return buffer.getvalue()


@pytest.fixture
def damaged(tmp_path, corpus):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "s.duckdb", SEEDS))
    runs = load_spec(spec)[0].runs
    spool, made, wrong = _entries(tmp_path, corpus, runs)
    return spec, spool, made, wrong


def test_damaged_spool_entries_never_count_as_stored(damaged):
    spec, spool, made, wrong = damaged
    assert spool.run_ids() == set()
    result = runner.invoke(app, ["plan", str(spec), "--format", "json"])
    assert result.exit_code == 0, result.output
    statuses = {r["run_id"]: r["status"] for r in json.loads(result.stdout)}
    assert all(statuses[rid] == "new" for rid in made)
    assert result.stderr.count("damaged spool entry") == len(made) and "Traceback" not in result.output
    assert "9 runs: 9 new, 0 spooled" in result.stderr
    assert all(os.path.lexists(spool.dir / f"{rid}.npz") for rid in made)  # plan moves nothing


@pytest.mark.slow
def test_a_run_moves_damaged_entries_aside_and_trains_their_runs(damaged):
    spec, spool, made, wrong = damaged
    result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.stderr.count("damaged spool entry") == len(made)
    moved = spool.damaged()
    assert len(moved) == len(made)
    for path in moved:
        why = path.with_name(path.name + ".why").read_text()
        assert why.endswith("\n") and len(why.strip().splitlines()) == 1
    with store.connect(spool.dir.with_name("s.duckdb"), read_only=True) as con:
        stored = dict(con.execute("SELECT run_id, final_val_ppl FROM runs WHERE status = 'done'").fetchall())
    assert set(made) <= set(stored) and len(stored) == 9
    assert stored[wrong.run_id] > 1.0  # the foreign entry's val_ppl 1.0 never replaced the real run's
    again = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert again.exit_code == 0 and "nothing to do" in again.stderr
    status = runner.invoke(app, ["status", "--db", str(spool.dir.with_name("s.duckdb"))])
    assert f"{len(made)} damaged spool entries kept in" in status.stderr


def test_an_archive_with_a_garbage_member_is_damaged(tmp_path):
    spool = Spool(tmp_path / "s.duckdb")
    spool.dir.mkdir(parents=True)
    with zipfile.ZipFile(spool.dir / "x.npz", "w") as z:
        z.writestr("meta.npy", b"\x93NUMPY garbage")
    assert spool.scan()[0] == {} and len(spool.scan()[1]) == 1
