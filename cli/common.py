"""What every command shares: the store and format options, one-line failures, error wording."""

from __future__ import annotations

import contextlib

import typer

from cli.output import FORMATS, printable
from contract.vocabulary import DEFAULT_STORE as DEFAULT_DB
DbOpt = typer.Option(None, "--db", envvar="SPECDB_DB", help="Store file (default: specdb.duckdb, "
                     "or the spec's `store` for run/plan).")
FormatOpt = typer.Option("table", "--format", "-f", help="table | json | csv | markdown")
SetOpt = typer.Option(None, "--set", "-S", help="Override a spec field: -S train.steps=50 (repeatable).")


@contextlib.contextmanager
def translated(where: str | None = None):
    """Every library error as one line on stderr and its exit code (spectraldb.errors' table);
    `where` is the user's predicate, so DuckDB's errors while evaluating it are named by kind only."""
    from spectraldb import errors

    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the table decides; anything it does not know is a bug
        if isinstance(exc, (typer.Exit, typer.Abort)) or errors.translation(exc) is None:
            raise
        fail(errors.message(exc, where), errors.exit_code(exc))


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


def reader(db: str | None, **options):
    """The store every read command reads through (spectraldb.reader.Reader), with the terminal's
    time limit (SPECDB_READ_TIME_S; default bounds.CLI_TIME_S); a missing store is refused when
    opened, naming --db."""
    from spectraldb.reader import Reader

    return Reader(db or DEFAULT_DB, check=False, **options)


EXTRAS = {"train": ("torch", "ray", "tokenizers"), "hf": ("torch", "ray", "transformers"),
          "serve": ("fastapi", "uvicorn")}


def need_extra(command: str, extra: str) -> None:
    """A command whose packages are an extra that is not installed says which, in one line (exit 2),
    before it does anything; reading a store needs none of them."""
    import importlib.util

    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"specdb {command}: needs {', '.join(missing)}, not installed here: pip install 'specdb[{extra}]'", 2)


def fail(message: str, code: int) -> None:
    """Diagnostics go to stderr as one line; data never does (a newline or control character that
    a predicate, a label or a path brought in is shown escaped)."""
    typer.echo(printable(message), err=True)
    raise typer.Exit(code)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        fail(f"--format: unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})", 2)
