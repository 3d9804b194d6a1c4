"""`specdb sql`: one read-only statement against the store."""

from __future__ import annotations

import duckdb

from spectraldb.errors import SpecError
from spectraldb.store import connect

ALLOWED = ("SELECT", "EXPLAIN")


def check_statement(con, text: str) -> None:
    """Exactly one SELECT/EXPLAIN statement; anything else is refused before it reaches the engine."""
    if not text or not text.strip():
        raise SpecError("sql: no statement given")
    try:
        statements = con.extract_statements(text)
    except duckdb.Error as exc:
        raise SpecError(f"sql: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise SpecError(f"sql: expected one statement, got {len(statements)}")
    kind = str(statements[0].type).rsplit(".", 1)[-1]
    if kind not in ALLOWED:
        raise SpecError(f"sql: {kind} statements are refused: the store is read-only here "
                        "(only SELECT and EXPLAIN run)")


def run_sql(path, text: str) -> tuple[list[str], list[dict]]:
    """Run one SELECT/EXPLAIN statement on a read-only connection without file access."""
    if not text or not text.strip():
        raise SpecError("sql: no statement given")
    with connect(path, read_only=True) as con:
        check_statement(con, text)
        try:
            cur = con.execute(text)
        except duckdb.Error as exc:
            raise SpecError(f"sql: {str(exc).splitlines()[0]}") from None
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, [dict(zip(cols, r)) for r in cur.fetchall()]
