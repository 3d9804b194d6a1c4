"""specdb's errors, and the one table that turns each into an exit code and an HTTP status.

Every edge translates errors here and nowhere else: the CLI (`cli.common.translated`) prints one
line and exits with `exit_code`; the service (`spectraldb.service.app`) answers `http_status`
with the same words (`message`). A traceback never reaches a user.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: one line naming the field or file, exit code 2, HTTP 400, nothing written."""


class SpecError(InputError):
    """A spec, an override or a store path that cannot be used."""


class QueryError(InputError):
    """A question that cannot be asked as put: an unknown metric or factor, a bad predicate, a
    window under 1, a read past its time limit."""


class StoreError(RuntimeError):
    """The store cannot be opened or is newer than this program."""


class StoreLocked(StoreError):
    """Another process held the store for longer than we were willing to wait."""


class StoreOutdated(StoreError):
    """The store's schema is older than this program's: `specdb run` migrates it."""


class MissingPackage(RuntimeError):
    """An optional package a feature needs is not installed (the message names it)."""


class RayStartError(RuntimeError):
    """Ray could not be started or reached: a runtime fault (exit 1), nothing was trained."""


OUT_OF_MEMORY = "out of memory: the answer does not fit this process's memory cap (SPECDB_PROCESS_MEMORY_MB raises it)"

# (exception type, exit code, HTTP status), most specific first; DuckDB's own errors come after
# (a query that parsed but failed while running: the user's input, 2 / 400).
TABLE: tuple[tuple[type, int, int], ...] = (
    (InputError, 2, 400),
    (StoreError, 2, 503),
    (MissingPackage, 1, 501),
    (RayStartError, 1, 503),
    (MemoryError, 1, 400),
)


def _duckdb_error() -> type | None:
    try:
        import duckdb
    except ImportError:  # pragma: no cover - duckdb is a dependency
        return None
    return duckdb.Error


def translation(exc: BaseException) -> tuple[int, int] | None:
    """(exit code, HTTP status) of a known error; None for anything else (a bug: exit 1, HTTP 500)."""
    for kind, code, status in TABLE:
        if isinstance(exc, kind):
            return code, status
    duck = _duckdb_error()
    if duck is not None and isinstance(exc, duck):
        return 2, 400
    return None


def exit_code(exc: BaseException) -> int:
    known = translation(exc)
    return known[0] if known else 1


def http_status(exc: BaseException) -> int:
    known = translation(exc)
    return known[1] if known else 500


def message(exc: BaseException, where: str | None = None) -> str:
    """The one line a user reads. DuckDB's errors are named by their kind only when a user
    predicate (`where`) was involved: DuckDB's text can quote the values it was evaluating."""
    if isinstance(exc, MemoryError):
        return OUT_OF_MEMORY
    duck = _duckdb_error()
    if duck is not None and isinstance(exc, duck) and translation(exc) == (2, 400):
        import duckdb

        if isinstance(exc, duckdb.OutOfMemoryException):
            return "query failed (out of memory; SPECDB_READ_MEMORY_MB raises the reader's limit)"
        kind = str(exc).split(":", 1)[0].strip()[:80] or type(exc).__name__
        if where:
            return f"--where: query failed: the predicate failed while being evaluated ({kind}); check its types and functions"
        return f"query failed ({kind})"
    if translation(exc) is None:
        return f"internal error ({type(exc).__name__})"
    return str(exc)


def one_line_text(text: str) -> str:
    """Text from a file as one printable line (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(text.split()))[:200]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
