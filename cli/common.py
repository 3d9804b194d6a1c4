"""What every command shares: the store and format options, one-line failures, error wording."""

from __future__ import annotations

import contextlib

import typer

from cli.output import FORMATS

DEFAULT_DB = "specdb.duckdb"
DbOpt = typer.Option(None, "--db", envvar="SPECDB_DB", help="Store file (default: specdb.duckdb, "
                     "or the spec's `store` for run/plan).")
FormatOpt = typer.Option("table", "--format", "-f", help="table | json | csv | markdown")
SetOpt = typer.Option(None, "--set", "-S", help="Override a spec field: -S train.steps=50 (repeatable).")


def duckdb_errors():
    import duckdb

    return duckdb.Error


def evaluation_error(exc: Exception, where: str | None) -> str:
    """A query that parsed and bound but failed while running. With a user predicate the message
    names only the kind of error: DuckDB's text can quote the values it was evaluating."""
    kind = str(exc).split(":", 1)[0].strip() or type(exc).__name__
    if where:
        return f"--where: the predicate failed while being evaluated ({kind}); check its types and functions"
    return f"query failed: {str(exc).strip().splitlines()[0][:200]}"


@contextlib.contextmanager
def capped_memory(limit_bytes: int):
    """This process's address space capped while a read runs (spectraldb.bounds), then restored:
    a runaway query fails with an out-of-memory error instead of taking the machine down."""
    import resource

    from spectraldb.bounds import cap_process_memory

    before = resource.getrlimit(resource.RLIMIT_AS)
    cap_process_memory(limit_bytes)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, before)


def cli_time_limit() -> float:
    """A query's time limit at the terminal (SPECDB_READ_TIME_S; default bounds.CLI_TIME_S)."""
    from spectraldb.bounds import CLI_TIME_S, ReadLimits

    return ReadLimits.from_env(CLI_TIME_S).time_s


def fail(message: str, code: int) -> None:
    """Diagnostics go to stderr as one line; data never does."""
    typer.echo(message, err=True)
    raise typer.Exit(code)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        fail(f"--format: unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})", 2)
