"""What one read may cost, whichever door it comes through (`specdb sql`, `specdb query
--where`, the service): time, memory, response bytes and heavy requests in flight.

Every limit has one default here and one environment variable that changes it (README,
"Security model"). DuckDB's own `memory_limit` bounds what its buffer manager holds, but not
every allocation (a `repeat()` string is outside it), so a process that serves reads also caps
its address space: a runaway query then fails with an out-of-memory error instead of the
kernel killing the process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

from spectraldb.errors import InputError, QueryError

GiB = 1024**3
MiB = 1024**2


def _env_number(name: str, default: float, low: float = 0.0) -> float:
    """A positive finite number from the environment; a bad value is a one-line InputError."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{name}: not a number ({text[:40]!r})") from None
    if not (value == value and low < value < float("inf")):
        raise InputError(f"{name}: must be a finite number above {low:g} (got {text[:40]!r})")
    return value


@dataclass(frozen=True)
class ReadLimits:
    time_s: float          # a statement's execution and serialisation together
    memory_bytes: int      # DuckDB memory_limit of a reader (spills beyond it, up to spill_bytes)
    spill_bytes: int       # temporary files a reader may write in its private spill folder
    response_bytes: int    # an answer's encoded size (the service) before it is cut with a note
    rows: int              # rows of one /api/sql answer before it is cut with a note
    heavy: int             # service requests computing at once (status and the dashboard never wait)
    process_bytes: int     # address space of a process that serves reads (`specdb serve`, CLI reads)

    @classmethod
    def from_env(cls, time_s: float = 10.0) -> "ReadLimits":
        return cls(time_s=_env_number("SPECDB_READ_TIME_S", time_s),
                   memory_bytes=int(_env_number("SPECDB_READ_MEMORY_MB", 1024, 16) * MiB),
                   spill_bytes=int(_env_number("SPECDB_READ_SPILL_MB", 1024, 1) * MiB),
                   response_bytes=int(_env_number("SPECDB_RESPONSE_MB", 16, 0.001) * MiB),
                   rows=int(_env_number("SPECDB_SQL_ROWS", 10_000, 0.5)),
                   heavy=int(_env_number("SPECDB_HEAVY_REQUESTS", 4, 0.5)),
                   process_bytes=int(_env_number("SPECDB_PROCESS_MEMORY_MB", 8192, 256) * MiB))


CLI_TIME_S = 300.0      # a researcher's own query at a terminal may run longer than a web request
SERVICE_TIME_S = 10.0


def address_space() -> int:
    """Bytes of address space this process maps now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def cap_process_memory(limit_bytes: int) -> None:
    """Cap this process's address space at what it maps now plus `limit_bytes` (never raising an
    existing lower cap): what the read may add, whatever the process had already loaded."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit_bytes += address_space()
    new = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
    if soft == resource.RLIM_INFINITY or new < soft:
        resource.setrlimit(resource.RLIMIT_AS, (new, hard))


_SPILL: list[str] = []
_SPILL_LOCK = threading.Lock()


def spill_folder() -> str:
    """This process's private spill folder (mode 0700, a fresh random name, removed at exit):
    readers never spill beside the store, where a query result could be planted or read."""
    with _SPILL_LOCK:
        if not _SPILL or not os.path.isdir(_SPILL[0]):
            _SPILL[:] = [tempfile.mkdtemp(prefix="specdb-spill-")]
            atexit.register(shutil.rmtree, _SPILL[0], True)
        return _SPILL[0]


class QueryTimeout(QueryError):
    """A read ran past its time limit (execution or serialisation)."""


def timeout_error(limit_s: float) -> QueryTimeout:
    return QueryTimeout(f"stopped after the time limit of {limit_s:g} s (SPECDB_READ_TIME_S raises it)")


class Deadline:
    """A read's deadline: interrupts its DuckDB connection once it passes (and again every 50 ms,
    so a statement started later is stopped too), and lets Python-side work check it."""

    def __init__(self, limit_s: float, con=None):
        self.limit_s, self.con = limit_s, con
        self.at = time.monotonic() + limit_s
        self._stop = threading.Event()
        self._thread = None
        if con is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="specdb-deadline")
            self._thread.start()

    def _watch(self) -> None:
        if self._stop.wait(max(0.0, self.at - time.monotonic())):
            return
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.con.interrupt()
            self._stop.wait(0.05)

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def check(self) -> None:
        if self.passed:
            raise timeout_error(self.limit_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
