"""specdb command line: a thin layer over spectraldb (docs/design.md §5). The commands live in
cli/sweep.py (run, plan, status), cli/query.py (query …) and cli/reads.py (sql, export, schema,
plot, report, serve); errors become one line and an exit code through spectraldb.errors' table.

Exit codes: 0 ok, 1 runtime error, 2 bad input, 3 sweep finished with failed/diverged runs.
"""

from __future__ import annotations

import os

import typer

from cli import reads, sweep
from cli.query import query_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative experiment database for optimizer-induced spectral scaling.")
app.add_typer(query_app, name="query")


def _version(value: bool) -> None:
    if value:
        from spectraldb.provenance import versions

        v = versions()
        typer.echo(f"specdb {v['specdb']} (torch {v['torch']}, duckdb {v['duckdb']}, ray {v['ray']}, "
                   f"python {v['python']})")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print specdb, torch, duckdb and ray versions.")):
    pass


# in the order `specdb --help` lists them
for command in (sweep.run, sweep.plan, sweep.status, sweep.measure, sweep.ingest, reads.sql, reads.export, reads.schema, reads.plot, reads.report,
                reads.serve):
    app.command()(command)


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    app()


if __name__ == "__main__":
    main()
