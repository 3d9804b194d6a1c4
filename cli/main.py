"""specdb command line: a thin layer over spectraldb (docs/design.md §5).

Exit codes: 0 ok, 1 runtime error, 2 bad input, 3 sweep finished with failed/diverged runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cli.common import (DEFAULT_DB, DbOpt, FormatOpt, SetOpt, capped_memory, check_format, cli_time_limit, fail,
                        translated)
from cli.output import printable, render, render_stream
from cli.query import DivergedOpt, SiteOpt, WhereOpt, query_app
from contract.vocabulary import PLAN_STATUSES

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
                                                 help="Tokenizer/dataset cache (default ~/.cache/specdb)"),
        max_in_flight: Optional[int] = typer.Option(None, "--max-in-flight", min=1,
                                                    help="Submit at most N runs to Ray at a time.")):
    """Train and measure every run the spec declares that the store does not hold yet.

    Example: specdb run experiments.yaml -S train.steps=100
    """
    from spectraldb.run.progress import reporter_for
    from spectraldb.run.sweep import EXECUTORS, run_sweep

    if executor not in EXECUTORS:
        fail(f"--executor: unknown executor {executor!r} (expected ray or inline)", 2)
    with translated():
        plan = _load(spec, set_)
        path = db or plan.store
        result = run_sweep(plan, path, executor=executor, address=address, retry_failed=retry_failed,
                           reporter=reporter_for(sys.stderr), cache_dir=cache_dir, max_in_flight=max_in_flight)
    for line in result.damaged:
        typer.echo(f"damaged spool entry {printable(line)}", err=True)
    if result.recovered:
        typer.echo(f"committed {result.recovered} finished run(s) from {path}.spool", err=True)
    if not result.statuses:
        typer.echo(f"nothing to do: all {result.total} runs of {spec} are already in {path}", err=True)
        return
    if result.waiting:
        fail(f"{len(result.waiting)} finished run(s) could not be committed and wait in {path}.spool "
             f"(the next `specdb run` commits them; first: {result.waiting[0]})", 1)
    counts = {s: list(result.statuses.values()).count(s) for s in sorted(set(result.statuses.values()))}
    typer.echo(f"stored {len(result.statuses)} runs in {path} ({', '.join(f'{n} {s}' for s, n in counts.items())};"
               f" {result.skipped} already there)", err=True)
    if not result.ok:
        raise typer.Exit(3)


@app.command()
def plan(spec: Path = typer.Argument(..., help="Spec file"), db: Optional[str] = DbOpt,
         set_: Optional[List[str]] = SetOpt, fmt: str = FormatOpt,
         executor: str = typer.Option("ray", help="The executor `run` would use: ray | inline"),
         address: Optional[str] = typer.Option(None, help="Plan for `run --address` on a Ray cluster: this machine's "
                                               "memory, CPUs and GPUs are not checked (run checks the cluster's)."),
         cache_dir: Optional[Path] = typer.Option(None, envvar="SPECDB_CACHE",
                                                  help="Tokenizer/dataset cache (default ~/.cache/specdb)")):
    """List every run of a spec with its status in the store (new / spooled / done / diverged /
    failed) and totals, after every check `specdb run` makes before training (same message, exit 2)."""
    from spectraldb.run.sweep import check_plan, plan_rows

    check_format(fmt)
    with translated():
        p = _load(spec, set_)
        check_plan(p, db or p.store, executor, address, cache_dir)
        rows = plan_rows(p, db or p.store)
    render(rows, fmt)
    counts = {s: sum(r["status"] == s for r in rows) for s in PLAN_STATUSES}
    typer.echo(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), err=True)
    _spool_notes(db or p.store)


def _spool_notes(db) -> None:
    """Damaged spool entries (now, and moved aside earlier): their runs are trained again."""
    from spectraldb.run.spool import Spool

    spool = Spool(db)
    for path, why in spool.scan()[1]:
        typer.echo(f"damaged spool entry {printable(path.name)}: {printable(why)}; the next `specdb run` moves it to "
                   f"{spool.damaged_dir.name}/ and trains its run again", err=True)
    moved = spool.damaged()
    if moved:
        typer.echo(f"{len(moved)} damaged spool entr{'y' if len(moved) == 1 else 'ies'} kept in {spool.damaged_dir} "
                   "(each with a .why file); their runs were trained again", err=True)


@app.command()
def status(spec: Optional[Path] = typer.Argument(None, help="A spec: count its runs (new ones too) and use its store."),
           db: Optional[str] = DbOpt, fmt: str = FormatOpt,
           runs: bool = typer.Option(False, "--runs", help="One row per run instead of per status.")):
    """Runs by status with their size, failed/diverged runs with their error line, runs in
    flight with their step (from a running `specdb run` on the same store), the store's size.

    Examples: specdb status · specdb status experiments.yaml · specdb status --runs --format csv
    """
    from contract.vocabulary import PROTOCOL
    from spectraldb import catalog
    from spectraldb.run.progress import read_sidecar
    from spectraldb.run.spool import Spool
    from spectraldb.store import connect

    check_format(fmt)
    if spec is not None:
        from spectraldb.run.sweep import plan_rows

        with translated():
            plan_ = _load(spec, [])
            rows = plan_rows(plan_, db or plan_.store)
        render([{"status": st, "runs": sum(r["status"] == st for r in rows)}
                for st in PLAN_STATUSES if any(r["status"] == st for r in rows)], fmt)
        typer.echo(f"{len(rows)} runs: " + ", ".join(f"{sum(r['status'] == st for r in rows)} {st}"
                                                    for st in PLAN_STATUSES), err=True)
        db = db or plan_.store
        if not Path(db).exists():
            return
    path = Path(db or DEFAULT_DB)
    with translated():
        with connect(path, read_only=True, verify=True) as con:
            table = catalog.run_sizes(con) if runs else catalog.status_summary(con)
            unfinished = catalog.unfinished(con)
            protocols = catalog.protocols(con)
    if spec is None:
        render(table.rows, fmt, table.columns)
    typer.echo(f"store {path}: {path.stat().st_size / 1048576:.1f} MiB on disk", err=True)
    for number, n in protocols.items():
        if number != PROTOCOL:
            typer.echo(f"{n} run(s) measured under protocol {number} (this specdb measures protocol {PROTOCOL}): "
                       "kept, never fitted together with current runs; see docs/design.md", err=True)
    spooled = Spool(path).run_ids()
    if spooled:
        typer.echo(f"{len(spooled)} finished run(s) waiting in {Spool(path).dir} to be committed "
                   "(the next `specdb run` on this store commits them first)", err=True)
    _spool_notes(path)
    flight, note = read_sidecar(path)
    if note:
        typer.echo(printable(note), err=True)
    for rid, info in flight.items():
        typer.echo(printable(f"in flight {rid} {info['label']}: step {info['step']}/{info['steps']}"), err=True)
    for row in unfinished:
        last = (row["error"] or "").strip().splitlines()[-1:] or [""]
        typer.echo(printable(f"{row['status']} {row['run_id']} {row['optimizer']} ffn_mult={row['ffn_mult']:g}: "
                             f"{last[0]}"), err=True)


@app.command()
def sql(query: Optional[str] = typer.Argument(None, help='A SELECT statement, or "-" to read it from stdin'),
        file: Optional[Path] = typer.Option(None, "--file", help="Read the statement from this file."),
        db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """Read-only SQL over the store: tables runs, evals, spectra, ranks, reinjection, run_points,
    step_points;
    views rank_metrics, layer_points, points, betas. Only SELECT (and EXPLAIN) statements run; the
    store is opened read-only and file access is disabled.

    Examples:

      specdb sql "SELECT optimizer, metric, beta FROM betas WHERE stratum = 'tail'"

      specdb sql --file q.sql --format csv

      echo "SELECT count(*) FROM runs" | specdb sql -
    """
    from spectraldb.bounds import CLI_TIME_S, ReadLimits
    from spectraldb.sqlshell import run_sql

    check_format(fmt)
    if file is not None:
        if not file.is_file():
            fail(f"--file: {file}: no such file", 2)
        text = file.read_text(encoding="utf-8")
    elif query is None or query == "-":
        text = sys.stdin.read()
    else:
        text = query
    notes = []
    with translated():
        limits = ReadLimits.from_env(CLI_TIME_S)
        with capped_memory(limits.process_bytes):
            run_sql(db or DEFAULT_DB, text, limits.time_s,
                    lambda cols, rows: notes.append(render_stream(cols, rows, fmt)))
    for note in notes:
        if note:
            typer.echo(note, err=True)


@app.command()
def export(directory: Path = typer.Argument(..., help="Folder to write (created if missing)"),
           fmt: str = typer.Option("parquet", "--format", "-f", help="parquet | csv"),
           db: Optional[str] = DbOpt):
    """Write every table and view of the store to DIR as one parquet or csv file each.

    Example: specdb export --format parquet exported/
    """
    from spectraldb.store import export_all

    if fmt not in ("parquet", "csv"):
        fail(f"--format: unknown export format {fmt!r} (expected parquet or csv)", 2)
    with translated():
        written = export_all(db or DEFAULT_DB, directory, fmt)
    for name, n in written:
        typer.echo(f"{directory / f'{name}.{fmt}'}: {n} rows", err=True)


@app.command()
def schema():
    """Print the JSON Schema of a spec file (for editor completion and validation).

    Example: specdb schema > specdb.schema.json
    """
    import json

    from spectraldb.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def plot(kind: str = typer.Argument(..., help="scaling | dynamics | depth | renyi"),
         output: Path = typer.Option(..., "-o", "--output", help="FILE.png, .svg or .pdf"),
         stratum: List[str] = typer.Option(["all"], "--stratum", help="Stratum; scaling takes several "
                                           "(--stratum all,tail: one row of panels each)"),
         site: str = SiteOpt, ffn_mult: Optional[float] = typer.Option(None, "--ffn-mult", help="Width for renyi."),
         step: Optional[int] = typer.Option(None, help="Measured step for renyi (default: final)."),
         include_diverged: bool = DivergedOpt, where: Optional[str] = WhereOpt, db: Optional[str] = DbOpt):
    """Draw one of the study's figures.

    scaling: rank vs FFN width (log–log) with fitted lines and 95% bands, hard and soft side by
    side, one row per stratum; dynamics: β over training; depth: β per layer; renyi: R_α and ρ_α
    against α at one width.

    Examples:

      specdb plot scaling --stratum all,tail -o scaling.png

      specdb plot renyi --ffn-mult 4 -o renyi.svg
    """
    from spectraldb import plots
    from spectraldb.selection import Selection
    from spectraldb.store import connect

    if kind not in ("scaling", "dynamics", "depth", "renyi"):
        fail(f"plot: unknown figure {kind!r} (expected scaling, dynamics, depth or renyi)", 2)
    if output.suffix.lower() not in (".png", ".svg", ".pdf"):
        fail(f"-o: {output}: use a .png, .svg or .pdf file name", 2)
    with translated(where):
        sel = Selection(stratum, site, where, include_diverged, step=step if kind == "renyi" else None)
        if kind == "renyi" and ffn_mult is None:
            fail("--ffn-mult: the renyi figure needs a width (e.g. --ffn-mult 4)", 2)
        with connect(db or DEFAULT_DB, read_only=True, time_limit_s=cli_time_limit()) as con:
            if kind == "scaling":
                fig = plots.scaling(con, sel)
            elif kind == "renyi":
                fig = plots.renyi(con, sel, ffn_mult=ffn_mult)
            else:
                fig = getattr(plots, kind)(con, sel)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=130)
    typer.echo(f"wrote {output}", err=True)


LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


@app.command()
def serve(db: Optional[str] = DbOpt, host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
          port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free port)."),
          token: Optional[str] = typer.Option(None, envvar="SPECDB_TOKEN",
                                              help="Require this token: `Authorization: Bearer TOKEN`, or a browser "
                                                   "opens /?token=TOKEN once."),
          allowed_host: Optional[List[str]] = typer.Option(None, "--allowed-host",
                                                           help="A name clients use to reach a non-loopback --host "
                                                                "(checked against the Host header; repeatable).")):
    """Serve the store read-only over HTTP: a JSON API with one endpoint per verb (/api/beta,
    /api/matched, /api/delta, /api/dynamics, /api/depth, /api/renyi, /api/runs, /api/status,
    POST /api/sql), the dashboard at / and OpenAPI docs at /docs (offline). Ctrl-C stops it.

    Only requests whose Host header names this server are answered (localhost, 127.0.0.1, [::1],
    and each --allowed-host). Reads are bounded (README, "Security model").

    Examples: specdb serve · specdb serve --host 0.0.0.0 --allowed-host lab-box --token "$(openssl rand -hex 16)"
    """
    import uvicorn

    from spectraldb.bounds import SERVICE_TIME_S, ReadLimits, cap_process_memory
    from spectraldb.service import create_app

    path = Path(db or DEFAULT_DB)
    if host not in LOOPBACK and not token:
        fail(f"--host {host}: serving beyond this machine needs --token (anyone who can reach the port could "
             "read the store otherwise)", 2)
    if token is not None and len(token) < 8:
        fail("--token: use at least 8 characters", 2)
    names = [h.strip() for part in allowed_host or [] for h in part.split(",") if h.strip()]
    for name in names:
        if not all(c.isalnum() or c in "-.[]:" for c in name) or len(name) > 253:
            fail(f"--allowed-host: {printable(name)!r} is not a host name", 2)
    if host in WILDCARDS and not names:
        fail(f"--host {host or '(all)'}: name the host names clients will use with --allowed-host (the Host header "
             "of every request is checked against them)", 2)
    if host not in LOOPBACK and host not in WILDCARDS:
        names.append(f"[{host}]" if ":" in host else host)
    if not path.is_file():
        fail(f"{path}: no such store (run `specdb run SPEC` first, or pass --db)", 2)
    from spectraldb.store import connect

    with translated():  # an outdated or damaged store is refused now, not on every request
        limits = ReadLimits.from_env(SERVICE_TIME_S)
        with connect(path, read_only=True):
            pass
    shown = "localhost" if host in LOOPBACK else (names[0] if names else host)
    typer.echo(f"serving {path} on http://{shown}:{port} (docs at /docs"
               f"{'; token required: a browser opens /?token=<token> once' if token else ''})", err=True)
    cap_process_memory(limits.process_bytes)
    # no access log: a browser's first /?token=… request would write the token into it
    uvicorn.run(create_app(path, token, names, limits), host=host, port=port, log_level="warning", access_log=False)


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    app()


if __name__ == "__main__":
    main()
