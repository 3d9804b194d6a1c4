"""The schema: numbered migrations shipped in spectraldb/migrations, applied in one transaction."""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import duckdb

from spectraldb.backfills import BACKFILL
from spectraldb.errors import StoreError, StoreOutdated


def migrations() -> list[tuple[int, str, str]]:
    """(number, name, sql) of every migration shipped with the package, in order."""
    out = []
    for f in resources.files("spectraldb.migrations").iterdir():
        if f.name.endswith(".sql"):
            out.append((int(f.name.split("_", 1)[0]), f.name, f.read_text(encoding="utf-8")))
    return sorted(out)


SCHEMA_VERSION = migrations()[-1][0]


def check_version(con, path: Path, migrate: bool) -> None:
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
                    con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [number, name, now()])
            con.execute("COMMIT")
        except BaseException:
            rollback(con)
            raise


def rollback(con) -> None:
    """Roll back if a transaction is still open; a failed ROLLBACK (DuckDB has already aborted
    it, e.g. on a full disk) must not hide the error that caused it."""
    with contextlib.suppress(duckdb.Error):
        con.execute("ROLLBACK")


def storage_version(con) -> str:
    """The storage format of the open store, e.g. 'v1.0.0+'."""
    return con.execute("SELECT tags['storage_version'] FROM duckdb_databases() WHERE database_name = "
                       "current_database()").fetchone()[0]


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
