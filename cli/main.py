"""specdb command line: a thin layer over spectraldb (DESIGN §5).

Exit codes: 0 ok, 1 runtime error, 2 bad input, 3 sweep finished with failed/diverged runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cli.output import FORMATS, render
from spectraldb.errors import SpecError, StoreError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative experiment database for optimizer-induced spectral scaling.")
query_app = typer.Typer(no_args_is_help=True, help="The study's questions, answered from the store.")
app.add_typer(query_app, name="query")

DEFAULT_DB = "specdb.duckdb"
DbOpt = typer.Option(None, "--db", envvar="SPECDB_DB", help="Store file (default: specdb.duckdb, "
                     "or the spec's `store` for run/plan).")
FormatOpt = typer.Option("table", "--format", "-f", help="table | json | csv | markdown")
SetOpt = typer.Option(None, "--set", "-S", help="Override a spec field: -S train.steps=50 (repeatable).")


def fail(message: str, code: int) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        fail(f"--format: unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})", 2)


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


def _load(spec: Path, overrides: Optional[List[str]]):
    from spectraldb.spec import load_spec

    plan, _ = load_spec(spec, overrides or [])
    return plan


@app.command()
def run(spec: Path = typer.Argument(..., help="Spec file, e.g. experiments.yaml"),
        db: Optional[str] = DbOpt, set_: Optional[List[str]] = SetOpt,
        executor: str = typer.Option("ray", help="ray (local Ray instance, or --address) | inline"),
        address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local one)"),
        retry_failed: bool = typer.Option(False, "--retry-failed", help="Also re-run runs stored as failed."),
        cache_dir: Optional[Path] = typer.Option(None, envvar="SPECDB_CACHE",
                                                 help="Tokenizer/dataset cache (default ~/.cache/specdb)")):
    """Train and measure every run the spec declares that the store does not hold yet.

    Example: specdb run experiments.yaml -S train.steps=100
    """
    from spectraldb.progress import reporter_for
    from spectraldb.scheduler import run_sweep

    try:
        if executor not in ("ray", "inline"):
            fail(f"--executor: unknown executor {executor!r} (expected ray or inline)", 2)
        plan = _load(spec, set_)
        path = db or plan.store
        result = run_sweep(plan, path, executor=executor, address=address, retry_failed=retry_failed,
                           reporter=reporter_for(sys.stderr), cache_dir=cache_dir)
    except (SpecError, StoreError) as exc:
        fail(str(exc), 2)
    if not result.statuses:
        typer.echo(f"nothing to do: all {result.total} runs of {spec} are already in {path}", err=True)
        return
    counts = {s: list(result.statuses.values()).count(s) for s in sorted(set(result.statuses.values()))}
    typer.echo(f"stored {len(result.statuses)} runs in {path} ({', '.join(f'{n} {s}' for s, n in counts.items())};"
               f" {result.skipped} already there)", err=True)
    if not result.ok:
        raise typer.Exit(3)


@app.command()
def plan(spec: Path = typer.Argument(..., help="Spec file"), db: Optional[str] = DbOpt,
         set_: Optional[List[str]] = SetOpt, fmt: str = FormatOpt):
    """List every run of a spec with its status in the store (new / done / failed) and totals."""
    from spectraldb.scheduler import plan_rows

    _check_format(fmt)
    try:
        p = _load(spec, set_)
        rows = plan_rows(p, db or p.store)
    except (SpecError, StoreError) as exc:
        fail(str(exc), 2)
    render(rows, fmt)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("new", "done", "diverged", "failed")}
    typer.echo(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), err=True)


@app.command()
def status(db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """Runs in the store by status, with each failure's last error line."""
    from spectraldb.store import connect

    _check_format(fmt)
    try:
        with connect(db or DEFAULT_DB, read_only=True) as con:
            rows = con.execute("""SELECT status, count(*) AS runs, string_agg(DISTINCT optimizer, ', ') AS optimizers
                                  FROM runs GROUP BY status ORDER BY status""").fetchall()
            failed = con.execute("SELECT run_id, optimizer, ffn_mult, error FROM runs "
                                 "WHERE status <> 'done' ORDER BY run_id").fetchall()
    except StoreError as exc:
        fail(str(exc), 2)
    render([{"status": s, "runs": n, "optimizers": o} for s, n, o in rows], fmt)
    for rid, opt, mult, err in failed:
        last = (err or "").strip().splitlines()[-1:] or [""]
        typer.echo(f"{rid} {opt} ffn_mult={mult:g}: {last[0]}", err=True)


@query_app.command("beta")
def query_beta(stratum: str = typer.Option("all", help="all | head | mid | tail"),
               site: str = typer.Option("post", help="pre | post"),
               db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """β_hard, β_soft and Δ₁,₂ of rank vs FFN width per optimizer.

    Example: specdb query beta --stratum tail --format json
    """
    from spectraldb.queries import BETA_KEYS, beta
    from spectraldb.store import connect

    _check_format(fmt)
    if stratum not in ("all", "head", "mid", "tail"):
        fail(f"--stratum: unknown stratum {stratum!r} (expected one of: all, head, mid, tail)", 2)
    if site not in ("pre", "post"):
        fail(f"--site: unknown site {site!r} (expected pre or post)", 2)
    try:
        with connect(db or DEFAULT_DB, read_only=True) as con:
            rows = beta(con, stratum, site)
    except StoreError as exc:
        fail(str(exc), 2)
    render(rows, fmt, list(BETA_KEYS))


@app.command()
def sql(query: str = typer.Argument(..., help="A SELECT statement"), db: Optional[str] = DbOpt,
        fmt: str = FormatOpt):
    """Run read-only SQL against the store (tables runs, evals, spectra, ranks; view points)."""
    import duckdb

    from spectraldb.store import connect

    _check_format(fmt)
    try:
        with connect(db or DEFAULT_DB, read_only=True) as con:
            cur = con.execute(query)
            cols = [d[0] for d in cur.description] if cur.description else []
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    except StoreError as exc:
        fail(str(exc), 2)
    except duckdb.Error as exc:
        fail(f"sql: {str(exc).splitlines()[0]}", 2)
    render(rows, fmt, cols)


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    app()


if __name__ == "__main__":
    main()
