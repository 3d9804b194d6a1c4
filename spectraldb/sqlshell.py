"""`specdb sql` and `POST /api/sql`: one plain query against the store, read-only and bounded.

A statement is classified from DuckDB's own parse: it must serialise as a SELECT
(`json_serialize_sql` serialises nothing else), and an EXPLAIN [ANALYZE] is allowed only when
the statement inside it does too — `EXPLAIN ANALYZE COPY …` executes its COPY. Rows are
streamed in chunks under the read's deadline, so memory stays flat at any result size.
"""

from __future__ import annotations

import json
from typing import Iterator

import duckdb

from spectraldb.bounds import Deadline
from spectraldb.errors import QueryError

CHUNK_ROWS = 64  # rows fetched at a time: wide rows (200 kB strings) stay a few MB in flight


def _serialises_as_select(con, text: str) -> bool:
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0])  # fetchall: no open result
    return not tree.get("error") and len(tree.get("statements", [])) == 1


def _explained(text: str) -> str | None:
    """The statement inside `EXPLAIN [ANALYZE] …` (None when the form is any other)."""
    tokens = [(offset, kind) for offset, kind in duckdb.tokenize(text) if kind != duckdb.token_type.comment]
    words = [text[offset:].split(None, 1)[0].upper() if text[offset:].strip() else "" for offset, _ in tokens[:3]]
    if not words or words[0] != "EXPLAIN":
        return None
    inner = 2 if len(words) > 1 and words[1] == "ANALYZE" else 1
    if len(tokens) <= inner:
        return None
    return text[tokens[inner][0]:]


def check_statement(con, text: str) -> None:
    """Exactly one plain query (or EXPLAIN [ANALYZE] of one); anything else is refused before it
    reaches the engine."""
    if not text or not text.strip():
        raise QueryError("sql: no statement given")
    if "\x00" in text:
        raise QueryError("sql: the statement holds a NUL byte")
    try:
        statements = con.extract_statements(text)
    except duckdb.Error as exc:
        raise QueryError(f"sql: {str(exc).splitlines()[0][:200]}") from None
    if len(statements) != 1:
        raise QueryError(f"sql: expected one statement, got {len(statements)}")
    kind = str(statements[0].type).rsplit(".", 1)[-1]
    refused = QueryError(f"sql: {kind} statements are refused: the store is read-only here "
                        "(only queries run: SELECT, or EXPLAIN [ANALYZE] of a SELECT)")
    if kind == "SELECT":
        if not _serialises_as_select(con, text):
            raise refused
    elif kind == "EXPLAIN":
        inner = _explained(text)
        if inner is None or not _serialises_as_select(con, inner):
            raise QueryError("sql: only EXPLAIN [ANALYZE] of a SELECT statement runs here")
    else:
        raise refused


def unique_columns(names: list[str]) -> list[str]:
    """Result column names made unique: `SELECT 1 AS a, 2 AS a` gives a, a_2 (never one
    column holding the wrong value)."""
    seen, out = set(), []
    for name in names:
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}_{n}"
        seen.add(candidate)
        out.append(candidate)
    return out


def sql_error(exc: duckdb.Error) -> QueryError:
    """DuckDB's message for errors about the statement (parser, binder, catalog); only the kind
    for errors raised while evaluating data, whose text can quote stored values."""
    text = str(exc).strip()
    kind = text.split(":", 1)[0].strip() or type(exc).__name__
    if isinstance(exc, (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException,
                        duckdb.PermissionException)):
        return QueryError(f"sql: {text.splitlines()[0][:200]}")
    if isinstance(exc, duckdb.OutOfMemoryException):
        return QueryError("sql: out of memory (SPECDB_READ_MEMORY_MB raises the reader's limit)")
    return QueryError(f"sql: the query failed while running ({kind})")


def _engine(call, deadline: Deadline):
    """DuckDB's answer to `call()`, its errors in specdb's words (an interrupt past the deadline
    is the time limit)."""
    try:
        return call()
    except duckdb.InterruptException:
        deadline.check()
        raise
    except duckdb.Error as exc:
        raise sql_error(exc) from None


def stream(con, text: str, deadline: Deadline) -> tuple[list[str], Iterator[tuple]]:
    """(unique column names, rows in chunks): the statement checked, then executed."""
    check_statement(con, text)
    cur = _engine(lambda: con.execute(text), deadline)
    cols = unique_columns([d[0] for d in cur.description] if cur.description else [])

    def rows():
        while True:
            deadline.check()
            chunk = _engine(lambda: cur.fetchmany(CHUNK_ROWS), deadline)
            if not chunk:
                return
            yield from chunk

    return cols, rows()
