"""`specdb sql`, `export`, `schema`, `plot`, `report` and `serve`: the store read in other ways."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cli.common import DEFAULT_DB, DbOpt, FormatOpt, capped_memory, check_format, fail, need_extra, reader, translated
from cli.output import printable, render_stream
from cli.query import DivergedOpt, SiteOpt, WhereOpt
from spectraldb.verbs import PLOTS


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
            reader(db, time_limit_s=limits.time_s).stream_sql(
                text, lambda cols, rows: notes.append(render_stream(cols, rows, fmt)))
    for note in notes:
        if note:
            typer.echo(note, err=True)


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


def schema(kind: str = typer.Option("sweep", "--kind", help="sweep (specdb run) | checkpoints (specdb measure)")):
    """Print the JSON Schema of a spec file (for editor completion and validation).

    Examples: specdb schema > specdb.schema.json · specdb schema --kind checkpoints
    """
    import json

    from spectraldb.spec.schema import checkpoints_schema, json_schema

    if kind not in ("sweep", "checkpoints"):
        fail(f"--kind: expected sweep or checkpoints, got {kind!r}", 2)
    typer.echo(json.dumps(json_schema() if kind == "sweep" else checkpoints_schema(), indent=2))


def plot(kind: str = typer.Argument(..., help=" | ".join(PLOTS)),
         output: Path = typer.Option(..., "-o", "--output", help="FILE.png, .svg or .pdf"),
         stratum: List[str] = typer.Option(["all"], "--stratum", help="Stratum; scaling takes several "
                                           "(--stratum all,tail: one row of panels each)"),
         site: str = SiteOpt, ffn_mult: Optional[float] = typer.Option(None, "--ffn-mult", help="Width for renyi."),
         step: Optional[int] = typer.Option(None, help="Measured step for renyi (default: final)."),
         include_diverged: bool = DivergedOpt, where: Optional[str] = WhereOpt, db: Optional[str] = DbOpt):
    """Draw one of the study's figures.

    scaling: rank vs FFN width (log–log) with fitted lines and 95% bands, hard and soft side by
    side, one row per stratum; dynamics: β over training; trajectories: hard rank over training, one
    line per width; depth: β per layer; renyi: R_α and ρ_α against α at one width (the figures of
    the questions declared in spectraldb/verbs.py).

    Examples:

      specdb plot scaling --stratum all,tail -o scaling.png

      specdb plot renyi --ffn-mult 4 -o renyi.svg
    """
    from spectraldb.selection import Selection

    if kind not in PLOTS:
        fail(f"plot: unknown figure {kind!r} (expected one of: {', '.join(PLOTS)})", 2)
    if output.suffix.lower() not in (".png", ".svg", ".pdf"):
        fail(f"-o: {output}: use a .png, .svg or .pdf file name", 2)
    with translated(where):
        sel = Selection(stratum, site, where, include_diverged, step=step if kind == "renyi" else None)
        if kind == "renyi" and ffn_mult is None:
            fail("--ffn-mult: the renyi figure needs a width (e.g. --ffn-mult 4)", 2)
        fig = reader(db).figure(kind, sel, **({"ffn_mult": ffn_mult} if kind == "renyi" else {}))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=130)
    typer.echo(f"wrote {output}", err=True)


def report(output: Path = typer.Option(..., "-o", "--output", help="FILE.html (one self-contained page) or a "
                                                                  "FOLDER for Markdown with PNG and CSV files"),
           include_diverged: bool = DivergedOpt, where: Optional[str] = WhereOpt, db: Optional[str] = DbOpt):
    """The study assembled from the store: β per stratum, rank against width, matched loss, β over
    training, Dion's rank fraction, optimizer gain against architecture shift, the Rényi family,
    β by layer and trainability — each from the same calls as `specdb query`/`plot`; a section
    the store cannot answer says which spec or factor would. The page needs no network.

    Examples:

      specdb report -o report.html

      specdb report -o report/ --where "steps = 1000"
    """
    from spectraldb import report as study
    from spectraldb.selection import Selection

    html = output.suffix.lower() in (".html", ".htm")
    parent = output.parent if html else output.absolute().parent
    if not parent.is_dir():
        fail(f"-o: {output}: folder {parent} does not exist", 2)
    if html and output.is_dir():
        fail(f"-o: {output} is a folder; name an .html file, or a folder without the .html suffix", 2)
    if not html and output.exists() and not output.is_dir():
        fail(f"-o: {output} is a file; name an .html file or a folder for Markdown", 2)
    with translated(where), _progress_line(sys.stderr) as progress:
        built = reader(db).report(Selection(where=where, include_diverged=include_diverged), progress)
    if html:
        study.write_html(built, output)
    else:
        study.write_markdown(built, output)
    missing = sum(1 for s in built.sections if s.missing)
    typer.echo(f"wrote {output}: {len(built.sections)} sections ({missing} need runs this store lacks)", err=True)


@contextlib.contextmanager
def _progress_line(stream):
    """On a terminal, one line rewritten in place as each section is built (`[3/9] β over
    training`) and cleared at the end; elsewhere (a log, a pipe) nothing."""
    if not stream.isatty():
        yield None
        return

    def show(done: int, total: int, title: str) -> None:
        stream.write(f"\r\x1b[2K[{done}/{total}] {printable(title)}")
        stream.flush()

    try:
        yield show
    finally:
        stream.write("\r\x1b[2K")
        stream.flush()


LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def serve(db: Optional[str] = DbOpt, host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
          port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free port)."),
          token: Optional[str] = typer.Option(None, envvar="SPECDB_TOKEN",
                                              help="Require this token: `Authorization: Bearer TOKEN`, or a browser "
                                                   "opens /?token=TOKEN once."),
          allowed_host: Optional[List[str]] = typer.Option(None, "--allowed-host",
                                                           help="A name clients use to reach a non-loopback --host "
                                                                "(checked against the Host header; repeatable).")):
    """Serve the store read-only over HTTP: a JSON API with one endpoint per verb (/api/beta,
    /api/matched, /api/delta, /api/dynamics, /api/trajectories, /api/depth, /api/renyi, /api/runs, /api/status,
    POST /api/sql), the dashboard at / and OpenAPI docs at /docs (offline). Ctrl-C stops it.

    Only requests whose Host header names this server are answered (localhost, 127.0.0.1, [::1],
    and each --allowed-host). Reads are bounded (README, "Security model").

    Examples: specdb serve · specdb serve --host 0.0.0.0 --allowed-host lab-box --token "$(openssl rand -hex 16)"
    """
    need_extra("serve", "serve")
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
    with translated():  # an outdated or damaged store is refused now, not on every request
        limits = ReadLimits.from_env(SERVICE_TIME_S)
        with reader(str(path)):
            pass
    shown = "localhost" if host in LOOPBACK else (names[0] if names else host)
    typer.echo(f"serving {path} on http://{shown}:{port} (docs at /docs"
               f"{'; token required: a browser opens /?token=<token> once' if token else ''})", err=True)
    cap_process_memory(limits.process_bytes)
    # no access log: a browser's first /?token=… request would write the token into it
    uvicorn.run(create_app(path, token, names, limits), host=host, port=port, log_level="warning", access_log=False)
