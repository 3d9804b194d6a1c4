"""Opening the store: file checks, polite lock retries, reader limits, the writer's attach.

Only the driver writes, and it holds the file only while it commits, so readers in other
processes (`specdb query`, `specdb sql`, `duckdb specdb.duckdb`) work during a sweep: every
open retries for a short while if another process holds the lock.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import duckdb

from spectraldb.bounds import MiB, Deadline, ReadLimits, spill_folder, timeout_error
from spectraldb.errors import StoreError, StoreLocked, StoreOutdated
from spectraldb.store.schema import check_version

LOCK_WAIT_S = 30.0
# New stores are written in DuckDB 1.0's storage format, the oldest that holds the schema, so the
# DuckDB CLI and Python packages of every 1.x release (and later ones) can open them.
STORAGE_VERSION = "v1.0.0"


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
    if "\\" in str(path):  # DuckDB would read it as a folder separator (spectraldb.sidecar.files.check_store_name)
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
    before = stamp(path) if path.exists() else None
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
            raise StoreError(f"{path}: not a usable specdb store ({first_line(exc)})") from None
    verify = (not read_only) if verify is None else verify
    try:
        try:
            if verify and VERIFIED.get(str(path)) != before:
                _check_size(con, path)
            now = stamp(path)
            if not (read_only and CURRENT.get(str(path)) == now):
                check_version(con, path, migrate=not read_only)
                CURRENT[str(path)] = now
        except duckdb.Error as exc:
            raise StoreError(f"{path}: damaged store ({first_line(exc)})") from None
        deadline = Deadline(time_limit_s, con) if time_limit_s is not None else None
        try:
            yield con
        except duckdb.InterruptException:
            if deadline is not None and deadline.passed:
                raise timeout_error(time_limit_s) from None
            raise
        except (duckdb.IOException, duckdb.FatalException, duckdb.InternalException) as exc:
            # the file failed under a query (a truncated store reads fine until a missing block)
            raise StoreError(f"{path}: damaged store or failing disk ({first_line(exc)})") from None
        finally:
            if deadline is not None:
                deadline.close()
    finally:
        con.close()
    if verify:  # the file as this process left it: the next open here need not measure it again
        with contextlib.suppress(OSError):
            VERIFIED[str(path)] = stamp(path)


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
CURRENT: dict[str, tuple] = {}
# path → (size, mtimes) this process last left a verified store at: a writer that opens it again
# unchanged (the sweep, once per run) skips measuring the file against its tables (~12 ms).
VERIFIED: dict[str, tuple] = {}


def stamp(path: Path) -> tuple:
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


def first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


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
