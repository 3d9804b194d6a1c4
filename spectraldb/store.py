"""The DuckDB store: numbered migrations, one transaction per finished run, polite locking.

Only the driver writes, and it holds the file only while it commits, so readers in other
processes (`specdb query`, `specdb sql`, `duckdb specdb.duckdb`) work during a sweep: every
open retries for a short while if another process holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from spectraldb import spectra
from spectraldb.backfills import BACKFILL
from spectraldb.bounds import MiB, Deadline, ReadLimits, spill_folder, timeout_error
from spectraldb.points import RUN_POINTS_SQL, RUN_STEP_POINTS_SQL
from spectraldb.errors import StoreError, StoreLocked
from workers.protocol import PROTOCOL
from workers.records import RunResult

LOCK_WAIT_S = 30.0
# New stores are written in DuckDB 1.0's storage format, the oldest that holds the schema, so the
# DuckDB CLI and Python packages of every 1.x release (and later ones) can open them.
STORAGE_VERSION = "v1.0.0"


def migrations() -> list[tuple[int, str, str]]:
    """(number, name, sql) of every migration shipped with the package, in order."""
    out = []
    for f in resources.files("spectraldb.migrations").iterdir():
        if f.name.endswith(".sql"):
            out.append((int(f.name.split("_", 1)[0]), f.name, f.read_text(encoding="utf-8")))
    return sorted(out)


SCHEMA_VERSION = migrations()[-1][0]


def _is_lock_error(exc: Exception) -> bool:
    # DuckDB: 'Could not set lock on file "…": Conflicting lock is held in … (PID n)'. Matching
    # bare "lock" would also match "block" in a corrupt file's checksum error.
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text


DUCKDB_MAGIC = b"DUCK"  # bytes 8–12 of every DuckDB database file


def _check_file(path: Path) -> None:
    """Refuse what is not a DuckDB file before DuckDB sees it (it would try to load an extension
    for an SQLite file, and waits or mis-reports for other damage)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the store ({exc.strerror or exc})") from None
    if not head:
        raise StoreError(f"{path}: an empty file, not a specdb store (remove it to start a new store there)")
    if head.startswith(b"SQLite format 3"):
        raise StoreError(f"{path}: not a specdb store (an SQLite database)")
    if len(head) < 12 or head[8:12] != DUCKDB_MAGIC:
        raise StoreError(f"{path}: not a specdb store (not a DuckDB file)")


def _config(read_only: bool, external_access: bool) -> dict:
    """No extension is ever installed or loaded on the fly; readers cannot reach other files and
    cannot change that from SQL (`--where`, `specdb sql`, the service). Readers hold at most
    `SPECDB_READ_MEMORY_MB` and spill only into this process's private folder (spectraldb.bounds)."""
    config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    if read_only and not external_access:
        limits = ReadLimits.from_env()
        config |= {"enable_external_access": False, "memory_limit": f"{limits.memory_bytes // MiB}MiB",
                   "temp_directory": spill_folder(), "max_temp_directory_size": f"{limits.spill_bytes // MiB}MiB",
                   "lock_configuration": True}
    return config


@contextlib.contextmanager
def connect(path: str | Path, read_only: bool = False, wait_s: float = LOCK_WAIT_S, external_access: bool = False,
            verify: bool | None = None, time_limit_s: float | None = None):
    """Open the store (creating and migrating it for writers), retrying while it is locked.

    Read-only connections cannot touch other files unless `external_access` (export only).
    `verify` (default: for writers) also checks that the file holds every block its tables use.
    `time_limit_s` stops every statement on the connection once that long has passed since it
    opened (a QueryTimeout, one line)."""
    path = Path(path)
    if "\\" in str(path):  # DuckDB would read it as a folder separator (writer.check_store_name)
        raise StoreError(f"{path}: a store path cannot contain a backslash (DuckDB reads it as a folder separator)")
    if read_only and not path.exists():
        raise StoreError(f"{path}: no such store (run `specdb run SPEC` first, or pass --db)")
    config = _config(read_only, external_access)
    if not path.exists() and not read_only:
        config["storage_compatibility_version"] = STORAGE_VERSION
    if path.exists():
        if path.is_dir():
            raise StoreError(f"{path}: is a folder, not a store file")
        _check_file(path)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con = duckdb.connect(str(path), read_only=True, config=config) if read_only else _open_writer(path, config)
            break
        except duckdb.Error as exc:
            if _is_lock_error(exc) and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            if _is_lock_error(exc):
                raise StoreLocked(f"{path}: locked by another process for over {wait_s:.0f}s") from None
            raise StoreError(f"{path}: not a usable specdb store ({_first_line(exc)})") from None
    try:
        try:
            if (not read_only) if verify is None else verify:
                _check_size(con, path)
            stamp = _stamp(path)
            if not (read_only and _CURRENT.get(str(path)) == stamp):
                _check_version(con, path, migrate=not read_only)
                _CURRENT[str(path)] = stamp
        except duckdb.Error as exc:
            raise StoreError(f"{path}: damaged store ({_first_line(exc)})") from None
        deadline = Deadline(time_limit_s, con) if time_limit_s is not None else None
        try:
            yield con
        except duckdb.InterruptException:
            if deadline is not None and deadline.passed:
                raise timeout_error(time_limit_s) from None
            raise
        except (duckdb.IOException, duckdb.FatalException, duckdb.InternalException) as exc:
            # the file failed under a query (a truncated store reads fine until a missing block)
            raise StoreError(f"{path}: damaged store or failing disk ({_first_line(exc)})") from None
        finally:
            if deadline is not None:
                deadline.close()
    finally:
        con.close()


# Rows per row group for writers. A checkpoint rewrites the table's last, partly filled row group
# whole; at DuckDB's default (122,880 rows) that group holds ~41 paper-scale runs' spectra, so
# each commit rewrote up to ~3 GB of eigenvalues and the file bloated (benchmarks/write.py).
ROW_GROUP_SIZE = 2048


def _open_writer(path: Path, config: dict):
    """A writer: the store attached with small row groups (a per-attach setting, so every
    writer must ask for it; readers of any DuckDB version read row groups of any size)."""
    version = config.pop("storage_compatibility_version", None)
    con = duckdb.connect(":memory:", config=config)
    try:
        options = f"ROW_GROUP_SIZE {ROW_GROUP_SIZE}" + (f", STORAGE_VERSION '{version}'" if version else "")
        con.execute(f"ATTACH '{str(path).replace(chr(39), chr(39) * 2)}' AS store ({options})")
        con.execute("USE store")
    except BaseException:
        con.close()
        raise
    return con


# path → (size, mtime) at which its schema was last found current: a reader that opens the same
# unchanged file again (the service, once per request) skips the schema queries.
_CURRENT: dict[str, tuple] = {}


def _stamp(path: Path) -> tuple:
    st = path.stat()
    try:  # a writer's checkpoint may remove the WAL between any two calls
        wal = Path(f"{path}.wal").stat().st_mtime_ns
    except FileNotFoundError:
        wal = None
    return st.st_size, st.st_mtime_ns, wal


def _check_size(con, path: Path) -> None:
    """A truncated store can open and answer the queries that touch only its first blocks; the
    highest block its tables use says how long the file must be (metadata only, ~20 ms)."""
    block_size = int(con.execute("SELECT block_size FROM pragma_database_size() "
                                 "WHERE database_name = current_database()").fetchone()[0] or 0)
    highest = -1
    for (table,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall():
        top = con.execute("SELECT max(block_id) FROM pragma_storage_info(?)", [table]).fetchone()[0]
        highest = max(highest, -1 if top is None else int(top))
    have, need = path.stat().st_size, (highest + 1) * block_size
    if have < need:
        raise StoreError(f"{path}: damaged store (truncated: {have:,} bytes, its tables need {need:,})")


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _check_version(con, path: Path, migrate: bool) -> None:
    has_table = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'").fetchone()[0]
    current = con.execute("SELECT max(version) FROM schema_version").fetchone()[0] if has_table else 0
    current = current or 0
    if current > SCHEMA_VERSION:
        raise StoreError(f"{path}: schema version {current} is newer than this specdb ({SCHEMA_VERSION}); "
                         "upgrade specdb")
    if current == 0 and not migrate:
        raise StoreError(f"{path}: not a specdb store (no schema); run `specdb run SPEC` to create one")
    if current < SCHEMA_VERSION:
        if not migrate:
            raise StoreOutdated(f"{path}: schema version {current} is older than this specdb "
                             f"({SCHEMA_VERSION}); run `specdb run` once to migrate it")
        con.execute("BEGIN")
        try:
            con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                        "name VARCHAR, applied_at TIMESTAMP)")
            for number, name, sql in migrations():
                if number > current:
                    con.execute(sql)
                    if number in BACKFILL:
                        BACKFILL[number](con)
                    con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [number, name, _now()])
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise


def _rollback(con) -> None:
    """Roll back if a transaction is still open; a failed ROLLBACK (DuckDB has already aborted
    it, e.g. on a full disk) must not hide the error that caused it."""
    with contextlib.suppress(duckdb.Error):
        con.execute("ROLLBACK")


class StoreOutdated(StoreError):
    """The store's schema is older than this program's: `specdb run` migrates it."""


def storage_version(con) -> str:
    """The storage format of the open store, e.g. 'v1.0.0+'."""
    return con.execute("SELECT tags['storage_version'] FROM duckdb_databases() WHERE database_name = "
                       "current_database()").fetchone()[0]


def migrate(path: str | Path) -> None:
    """Bring an existing store up to this program's schema (a no-op when it is current). A current
    store is only read, so a reader holding the file does not stop a sweep from starting."""
    if not Path(path).exists():
        return
    try:
        with connect(path, read_only=True, verify=True):
            return
    except StoreOutdated:
        pass
    with connect(path):
        pass


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _ts(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None)


def statuses(path: str | Path) -> dict[str, str]:
    """run_id → status of every run in the store ({} if there is no store yet)."""
    if not Path(path).exists():
        return {}
    with connect(path, read_only=True, verify=True) as con:  # a truncated store is not "all done"
        return dict(con.execute("SELECT run_id, status FROM runs").fetchall())


def rank_rows(run_id: str, records: list[dict]) -> list[dict]:
    """One ranks row (by column name) per computed spectrum, from the metrics attached to it
    (`spectraldb.spectra.attach_metrics`: by the worker, or by `write_run` for records without)."""
    return [{"run_id": run_id, "step": r["step"], "layer": r["layer"], "site": r["site"], "stratum": r["stratum"],
             "n_tokens": r["n_tokens"], **r["metrics"]} for r in records if r["eigenvalues"] is not None]


def reinjection_rows(run_id: str, records: list[dict]) -> list[dict]:
    """JS(pre, post) and ρ_α = R_α(post)/R_α(pre) where both sites were computed (attached as for
    `rank_rows`)."""
    return [{"run_id": run_id, "step": r["step"], "layer": r["layer"], "stratum": r["stratum"], **r["reinjection"]}
            for r in records if "reinjection" in r]


def series_from_end(records: list[dict]) -> dict[tuple, int]:
    """(step, layer, site, stratum) → 1 for the last measured value of its layer × site × stratum
    series, 2 for the one before, … counting only computed spectra: a step at which a stratum
    was skipped does not use up a place of the window (the study's "last K finite values").
    This is the one definition of a run's window; ranks.from_end stores it."""
    series: dict[tuple, list[int]] = {}
    for r in records:
        if r["eigenvalues"] is not None:
            series.setdefault((r["layer"], r["site"], r["stratum"]), []).append(r["step"])
    return {(step, *key): i + 1 for key, steps in series.items()
            for i, step in enumerate(sorted(steps, reverse=True))}


def _kept(records: list[dict], from_end: dict[tuple, int], last_k: int) -> list[dict]:
    """Drop the eigenvalues (not the record) of every spectrum outside its series' window."""
    key = lambda r: (r["step"], r["layer"], r["site"], r["stratum"])  # noqa: E731
    return [r if from_end.get(key(r), last_k + 1) <= last_k else {**r, "eigenvalues": None} for r in records]


def write_run(path: str | Path, run, result: RunResult, provenance: dict, spec_name: str = "",
              wait_s: float = LOCK_WAIT_S) -> str:
    """Store one finished run (done, diverged or failed) in a single transaction; returns the
    status the store holds for it afterwards.

    `run` is a spectraldb.spec.RunSpec; `result` is what workers.train.run returned (a
    workers.records.RunResult). A run
    stored again (a retried failure) replaces its earlier rows, except that a `done` run is
    never replaced by a failed or diverged one (whatever race produced the second result).
    """
    rid = run.run_id
    evals = result.get("evals", [])
    final = evals[-1] if evals else {}
    m, started, finished = run.model, result.get("started_at"), result.get("finished_at")
    run_row = {
        "run_id": rid, "spec_name": spec_name, "optimizer": run.label, "optimizer_name": run.optimizer.name,
        "lr": run.optimizer.lr, "ffn_mult": m.ffn_mult, "ffn_width": m.ffn_width, "d_model": m.d_model,
        "n_layer": m.n_layer, "n_head": m.n_head, "context": run.data.context, "vocab_size": result.get("vocab_size"),
        "corpus": run.data.corpus, "seed": run.train.seed, "steps": run.train.steps,
        "batch_size": run.train.batch_size, "measure_source": run.measure.source, "last_k": run.measure.last_k,
        "status": result["status"], "error": result.get("error"), "final_val_loss": _finite(final.get("val_loss")),
        "final_val_ppl": _finite(final.get("val_ppl")), "config": json.dumps(run.config()),
        "git_commit": provenance.get("git_commit"), "versions": json.dumps(provenance.get("versions", {})),
        "host": provenance.get("host"), "device": result.get("device"), "started_at": _ts(started),
        "finished_at": _ts(finished), "duration_s": (finished - started) if finished else None,
        "pos": m.pos, "norm": m.norm, "postln_frac": m.n_post_norm / m.n_layer, "activation": m.activation,
        "keep_eigenvalues": run.measure.keep_eigenvalues, "protocol": result.get("protocol", PROTOCOL),
    }
    eval_rows = [{"run_id": rid, "step": e["step"], "train_loss": _finite(e["train_loss"]),
                  "val_loss": _finite(e["val_loss"]), "val_ppl": _finite(e["val_ppl"])} for e in evals]
    records = spectra.attach_metrics(result.get("spectra", []))  # a no-op for a worker's records
    from_end = series_from_end(records)
    rank = [{**row, "from_end": from_end.get((row["step"], row["layer"], row["site"], row["stratum"]))}
            for row in rank_rows(rid, records)]
    reinjection = reinjection_rows(rid, records)
    stored = _kept(records, from_end, run.measure.last_k) if run.measure.keep_eigenvalues == "last_k" else records
    spec_rows = [{"run_id": rid, "step": s["step"], "layer": s["layer"], "site": s["site"], "stratum": s["stratum"],
                  "n_tokens": s["n_tokens"], "n_dim": s["n_dim"], "skipped": s["min_eigenvalue"] is None,
                  "min_eigenvalue": s["min_eigenvalue"],
                  "eigenvalues": None if s["eigenvalues"] is None else np.asarray(s["eigenvalues"], dtype=np.float64)}
                 for s in stored]
    with connect(path, wait_s=wait_s) as con:
        # a run's rows are written once, into the file: a commit that crosses this threshold
        # checkpoints instead of first copying everything into the WAL (about half the time)
        con.execute("SET checkpoint_threshold = '1MB'")
        con.execute("BEGIN")
        try:
            held = con.execute("SELECT status FROM runs WHERE run_id = ?", [rid]).fetchone()
            if held and held[0] == "done" and result["status"] != "done":
                con.execute("ROLLBACK")
                return "done"
            for table in ("step_points", "run_points", "reinjection", "ranks", "spectra", "evals", "runs"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [rid])
            for table, rows in (("runs", [run_row]), ("evals", eval_rows), ("spectra", spec_rows),
                                ("ranks", rank), ("reinjection", reinjection)):
                _insert(con, table, rows)
            con.execute(RUN_POINTS_SQL, [rid])
            con.execute(RUN_STEP_POINTS_SQL, [rid])
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
    return result["status"]


def _insert(con, table: str, rows: list[dict]) -> None:
    """Insert rows by column name, as one columnar batch (every row has the keys of the first)."""
    if rows:
        batch = pa.table({c: _column([r[c] for r in rows]) for c in rows[0]})
        con.register("_specdb_batch", batch)
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


def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None



EXPORTED = ("runs", "evals", "spectra", "ranks", "reinjection", "run_points", "step_points", "rank_metrics", "layer_points",
            "points", "betas")


def export_all(path: str | Path, directory: Path, fmt: str) -> list[tuple[str, int]]:
    """Copy every table and view to DIR/<name>.<fmt>; returns (name, rows) per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    options = "(FORMAT parquet)" if fmt == "parquet" else "(FORMAT csv, HEADER)"
    out = []
    with connect(path, read_only=True, external_access=True) as con:  # COPY … TO writes files
        for name in EXPORTED:
            target = str(directory / f"{name}.{fmt}").replace("'", "''")
            con.execute(f"COPY (SELECT * FROM {name}) TO '{target}' {options}")
            out.append((name, con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]))
    return out
