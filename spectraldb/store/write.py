"""Writing one finished run: every table in a single transaction (only the driver calls this)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from contract.metrics import attach_metrics
from contract.records import RunResult
from spectraldb.points import RUN_POINTS_SQL, RUN_STEP_POINTS_SQL
from spectraldb.store import rows
from spectraldb.store.opening import LOCK_WAIT_S, connect
from spectraldb.store.schema import rollback


def write_run(path: str | Path, run, result: RunResult, provenance: dict, spec_name: str = "",
              vocab_size: int | None = None, wait_s: float = LOCK_WAIT_S) -> str:
    """Store one finished run (done, diverged or failed) in a single transaction; returns the
    status the store holds for it afterwards.

    `run` is a spectraldb.spec.RunSpec; `result` what the worker returned; `vocab_size` the size
    of the dataset's vocabulary (the driver prepared it). A run stored again (a retried failure)
    replaces its earlier rows, except that a `done` run is never replaced by a failed or diverged
    one (whatever race produced the second result).
    """
    return write_runs(path, [(run, result, provenance, spec_name, vocab_size)], wait_s)[0]


def write_runs(path: str | Path, finished: Iterable[tuple], wait_s: float = LOCK_WAIT_S,
               atomic: bool = False) -> list[str]:
    """Store several finished runs through one connection, as `write_run` does: `finished` holds
    (run, result, provenance, spec_name, vocab_size) tuples. Each run is its own transaction (an
    error stops at that run; those before it stay), or with `atomic` all of them are one (all or
    nothing, and their points computed in one pass). Returns the status the store holds for each."""
    finished = list(finished)
    with connect(path, wait_s=wait_s) as con:
        # a run's rows are written once, into the file: a commit that crosses this threshold
        # checkpoints instead of first copying everything into the WAL (about half the time)
        con.execute("SET checkpoint_threshold = '1MB'")
        if not atomic:
            return [_in_transaction(con, lambda item=item: _replace(con, *item)) for item in finished]

        def everything():
            statuses = [_replace(con, *item, points=False) for item in finished]
            _points(con, [item[0].run_id for item, status in zip(finished, statuses) if status == item[1].status])
            return statuses

        return _in_transaction(con, everything)


def _in_transaction(con, work):
    con.execute("BEGIN")
    try:
        out = work()
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise
    return out


def _points(con, run_ids: list[str]) -> None:
    if run_ids:
        con.execute(RUN_POINTS_SQL, [run_ids])
        con.execute(RUN_STEP_POINTS_SQL, [run_ids])


def _replace(con, run, result: RunResult, provenance: dict, spec_name: str, vocab_size: int | None,
             points: bool = True) -> str:
    """Replace one run's rows (inside the caller's transaction); a `done` run is kept as it is."""
    rid = run.run_id
    held = con.execute("SELECT status FROM runs WHERE run_id = ?", [rid]).fetchone()
    if held and held[0] == "done" and result.status != "done":
        return "done"
    records = attach_metrics(result.spectra)  # a no-op for a worker's records
    from_end = rows.series_from_end(records)
    rank = [{**row, "from_end": from_end.get((row["step"], row["layer"], row["site"], row["stratum"]))}
            for row in rows.rank_rows(rid, records)]
    stored = rows.kept(records, from_end, run.measure.last_k) if run.measure.keep_eigenvalues == "last_k" else records
    for table in ("step_points", "run_points", "reinjection", "ranks", "spectra", "evals", "runs"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [rid])
    for table, batch in (("runs", [rows.run_row(run, result, provenance, spec_name, vocab_size)]),
                         ("evals", rows.eval_rows(rid, result)), ("spectra", rows.spectra_rows(rid, stored)),
                         ("ranks", rank), ("reinjection", rows.reinjection_rows(rid, records))):
        _insert(con, table, batch)
    if points:
        _points(con, [rid])
    return result.status


def _insert(con, table: str, batch: list[dict]) -> None:
    """Insert rows by column name, as one columnar batch (every row has the keys of the first)."""
    if batch:
        arrow = pa.table({c: _column([r[c] for r in batch]) for c in batch[0]})
        con.register("_specdb_batch", arrow)
        try:
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _specdb_batch")
        finally:
            con.unregister("_specdb_batch")


def _column(values: list) -> pa.Array:
    """An Arrow column; a column of numpy arrays (eigenvalues) becomes list<double> without
    a Python float per value."""
    if not any(isinstance(v, np.ndarray) for v in values):
        return pa.array(values)
    lengths = np.array([0 if v is None else len(v) for v in values], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]).astype(np.int32)
    flat = np.concatenate([np.asarray(v, dtype=np.float64) for v in values if v is not None] or [np.zeros(0)])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat),
                                    mask=pa.array([v is None for v in values]))
