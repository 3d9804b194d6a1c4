"""Where finished runs go: the store, else the spool, else memory until the sweep ends."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from contract.records import RunResult
from spectraldb import store
from spectraldb.errors import one_line
from spectraldb.run.executors import checkpoint_path
from spectraldb.sidecar.spool import Spool, drain
from spectraldb.spec import RunSpec

COMMIT_WAIT_S = 5.0      # during a sweep: wait this long for a reader, then spool and go on


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value == value and 0 <= value < float("inf") else default


FINAL_WAIT_S = _env_seconds("SPECDB_SPOOL_WAIT", 300.0)  # at the end: keep trying this long


class Sink:
    """Where finished runs go: the store if it can be written within COMMIT_WAIT_S, else the
    spool (durably), else, if even the spool cannot be written, memory until the sweep ends."""

    def __init__(self, plan, db, prov, reporter, result, spool: Spool):
        self.plan, self.db, self.prov, self.reporter, self.result, self.spool = plan, db, prov, reporter, result, spool
        self.unspooled: list[tuple[RunSpec, RunResult, int | None]] = []

    def put(self, run: RunSpec, res: RunResult, vocab_size: int | None) -> None:
        note = ""
        try:
            status = store.write_run(self.db, run, res, self.prov, self.plan.spec_name, vocab_size=vocab_size,
                                     wait_s=COMMIT_WAIT_S)
            if status != res.status:
                note = f" (the store already holds it as {status}; kept)"
        except Exception as exc:  # noqa: BLE001 - any commit error: keep the result, go on
            note = f" — not committed yet ({one_line(exc)}); {self._keep(run, res, vocab_size)}"
        else:
            self.retry(COMMIT_WAIT_S)
        ckpt = checkpoint_path(run)
        if ckpt and res.status != "failed" and not run.checkpoint.keep:
            Path(ckpt).unlink(missing_ok=True)  # stored or spooled: the checkpoint has done its job
        self.result.statuses[run.run_id] = res.status
        detail = ""
        if res.final is not None:
            detail = f" val_ppl={res.final.val_ppl:.1f}"
        if res.error:
            detail += f" — {(res.error.strip().splitlines() or [''])[-1]}"
        self.reporter.finish(run.run_id, describe(run), res.status, res.duration_s or 0.0, detail + note)

    def _keep(self, run: RunSpec, res: RunResult, vocab_size: int | None) -> str:
        try:
            path = self.spool.put(run.run_id, run.config(), res, self.prov, self.plan.spec_name, vocab_size)
            return f"kept in {path}"
        except OSError as exc:
            self.unspooled.append((run, res, vocab_size))
            return f"the spool cannot be written either ({one_line(exc)}); held in memory"

    def retry(self, wait_s: float) -> list[str]:
        """Commit what waits (memory first, then the spool); returns what still waits."""
        still = []
        for run, res, vocab_size in self.unspooled:
            try:
                store.write_run(self.db, run, res, self.prov, self.plan.spec_name, vocab_size=vocab_size,
                                wait_s=wait_s)
            except Exception as exc:  # noqa: BLE001
                still.append((run, res, vocab_size, exc))
        self.unspooled = [(r, x, v) for r, x, v, _ in still]
        _, waiting = drain(self.spool, self.db, wait_s) if self.spool.pending() else (0, [])
        return [f"{r.run_id}: {one_line(e)} (in memory only)" for r, _, _, e in still] + waiting

    def spool_memory(self) -> None:
        for run, res, vocab_size in self.unspooled:
            with contextlib.suppress(OSError):
                self.spool.put(run.run_id, run.config(), res, self.prov, self.plan.spec_name, vocab_size)

    def finish(self) -> list[str]:
        """At the end of the sweep keep trying for FINAL_WAIT_S (a long reader only delays us)."""
        deadline = time.monotonic() + FINAL_WAIT_S
        waiting, told = self.retry(COMMIT_WAIT_S), (None, 0.0)
        while waiting and time.monotonic() < deadline:
            if (len(waiting), waiting[0]) != told[0] or time.monotonic() - told[1] > 30:
                self.reporter.note(f"{len(waiting)} finished run(s) waiting to be committed: {waiting[0]}")
                told = ((len(waiting), waiting[0]), time.monotonic())
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))  # a full disk answers at once
            waiting = self.retry(min(30.0, max(0.1, deadline - time.monotonic())))
        return waiting


def describe(run: RunSpec) -> str:
    """The progress line's name for a run: optimizer label, width and seed."""
    return f"{run.label} ffn_mult={run.model.ffn_mult:g} seed={run.train.seed}"
