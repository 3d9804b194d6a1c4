"""The DuckDB store: numbered migrations, one transaction per finished run, polite locking.

- `connect`: opening the file (checks, lock retries, reader limits) and `migrate`;
- `migrate`: the numbered migrations and the schema version check;
- `rows`: a finished run as table rows (pure);
- `write`: `write_run` (and `write_runs`, several through one connection), the one writer;
- `export`: tables and views to parquet or csv.
"""

from spectraldb.store.opening import LOCK_WAIT_S, ROW_GROUP_SIZE, STORAGE_VERSION, connect, migrate, stamp
from spectraldb.store.export import EXPORTED, export_all
from spectraldb.store.schema import SCHEMA_VERSION, migrations, storage_version
from spectraldb.store.write import write_run, write_runs

__all__ = ["EXPORTED", "LOCK_WAIT_S", "ROW_GROUP_SIZE", "SCHEMA_VERSION", "STORAGE_VERSION", "connect",
           "export_all", "migrate", "migrations", "stamp", "storage_version", "write_run", "write_runs"]
