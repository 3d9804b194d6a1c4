"""`specdb serve`: the store as a read-only HTTP service (FastAPI), one endpoint per verb.

Every request opens the store read-only (file access and extensions disabled, configuration
locked; the same checks as the CLI) and retries politely while a driver commits. Parameters,
defaults and error words are the CLI's: each endpoint builds one Selection and calls the same
library function as the CLI (spectraldb.queries, spectraldb.catalog, spectraldb.plots). Answers
are `{"rows": [...], "notes": [...]}` with exactly the records `specdb query … --format json`
prints. Errors are translated once, by spectraldb.errors' table.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from pathlib import Path

from pydantic import BaseModel

from spectraldb import errors, store
from spectraldb.bounds import SERVICE_TIME_S, Deadline, ReadLimits
from spectraldb.errors import QueryError, StoreLocked
from spectraldb.sidecar.progress import read_sidecar
from spectraldb.selection import Selection, split
from spectraldb.service import assets, guard
from spectraldb.service.cache import AnswerCache
from spectraldb.reader import Reader
from spectraldb.verbs import VERBS

log = logging.getLogger("specdb.service")


def records(rows: list[dict]) -> list[dict]:
    """Rows as JSON records: what the CLI's `--format json` prints, with NaN/inf as null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return [{k: clean(v) for k, v in r.items()} for r in json.loads(json.dumps(rows, default=str))]


class SQLRequest(BaseModel):
    query: str


def create_app(db: str | Path, token: str | None = None, allowed_hosts=(), limits: ReadLimits | None = None):
    """The app for one store. `allowed_hosts`: names besides the loopback ones that clients may use
    in `Host` (those of a non-loopback `--host`); `limits`: the read limits (spectraldb.bounds)."""
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    db = Path(db)
    limits = limits or ReadLimits.from_env(SERVICE_TIME_S)
    app = FastAPI(title="specdb", version="1", docs_url=None, redoc_url=None,
                  description="Read-only queries over a specdb store: the study's questions (β, matched pairs, Δ), "
                              "runs, spectra and SQL.")

    def detail(message: str, status: int, headers: dict | None = None):
        return JSONResponse({"detail": guard.scrub(message, db)}, status_code=status, headers=headers)

    guard.install_turns(app, heavy=limits.heavy, time_s=limits.time_s, detail=detail)
    AnswerCache(db).install(app)
    guard.install_outer(app, token=token, hosts={h.lower() for h in (*guard.LOOPBACK_NAMES, *allowed_hosts)},
                        detail=detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        name = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        return detail(f"--{name}: {err.get('msg', 'invalid')}", 422)

    async def translated(request, exc: Exception):
        """spectraldb.errors' table: the status and the words; never a traceback."""
        status = errors.http_status(exc)
        if status == 500:
            log.error("internal error (%s)", type(exc).__name__)
        return detail(errors.message(exc, request.query_params.get("where")), status)

    import duckdb

    for kind in (*(row[0] for row in errors.TABLE), duckdb.Error, Exception):
        app.add_exception_handler(kind, translated)

    def body(payload) -> Response:
        """An answer encoded here, in the worker thread (never on the event loop), within the byte cap."""
        data = json.dumps(payload, default=str, allow_nan=False).encode()
        if len(data) > limits.response_bytes:
            raise QueryError(f"the answer is {len(data) / 2**20:.1f} MiB, over the {limits.response_bytes / 2**20:g} MiB "
                             "cap; narrow it (where=, limit=) or raise SPECDB_RESPONSE_MB")
        return Response(data, media_type="application/json")

    def reader(**options) -> Reader:
        """The store as every route reads it: `with reader() as r:` holds one connection."""
        return Reader(db, limits.time_s, check=False, **options)

    def route(verb):
        """`GET /api/NAME` of one declared question: its options as query parameters."""

        def endpoint(**values):
            result = reader().ask(verb, values)
            return body({"rows": records(result.rows), "notes": result.all_notes()})

        params = []
        for o in verb.options:
            if o.kind is list:
                annotation, default = list[str] | None, Query(None)
            elif o.required:
                annotation, default = o.kind, inspect.Parameter.empty
            else:
                annotation, default = (o.kind if o.default is not None else o.kind | None), o.default
            params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
        endpoint.__signature__ = inspect.Signature(params)
        endpoint.__name__, endpoint.__doc__ = verb.name, f"{verb.summary} (as `specdb query {verb.name}`)."
        app.get(f"/api/{verb.name}", summary=verb.summary)(endpoint)

    for verb in VERBS:
        route(verb)

    @app.get("/api/scaling")
    def scaling(stratum: str = "all", site: str = "post", include_diverged: bool = False,
                by: list[str] | None = Query(None), where: str | None = None):
        """The study's main figure as data: per group, the seed-mean points, β with its interval
        and the fitted line with its 95% band, for hard and soft rank (as `specdb plot scaling`)."""
        data, notes = reader().scaling(Selection(stratum, site, where, include_diverged, split(by)))
        return body({"series": json.loads(json.dumps(data)), "notes": notes})

    @app.get("/", include_in_schema=False)
    def dashboard():
        return HTMLResponse(assets.DASHBOARD.read_text(encoding="utf-8"))

    @app.get("/docs", include_in_schema=False)
    def docs():
        return HTMLResponse((assets.STATIC / "docs.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str):
        if name not in assets.FILES:
            raise HTTPException(status_code=404, detail="no such file")
        kind = "text/css" if name.endswith(".css") else "application/javascript"
        return FileResponse(assets.FILES[name](), media_type=kind)

    @app.get("/api/runs")
    def runs(status: str | None = None, optimizer: str | None = None, where: str | None = None,
             limit: int = Query(100, ge=1, le=10_000), offset: int = Query(0, ge=0)):
        """Runs with their factors and final perplexity, filtered and paged."""
        with reader() as r:
            found = r.runs(status=status, optimizer=optimizer, where=where, limit=limit, offset=offset)
            total = r.count_runs(status=status, optimizer=optimizer, where=where)
        return body({"rows": records(found.rows), "total": total, "limit": limit, "offset": offset})

    def public(info: dict) -> dict:
        """A run row as the API shows it: the error's exception line, paths by their names only
        (the full traceback stays in the store, for `specdb status` and SQL)."""
        config = json.loads(info["config"]) if info.get("config") else None
        if config:
            for section, key in (("data", "corpus"), ("checkpoint", "dir")):
                if isinstance(config.get(section), dict) and isinstance(config[section].get(key), str):
                    config[section][key] = Path(config[section][key]).name
        return {**info, "config": config, "corpus": Path(info["corpus"]).name if info.get("corpus") else None,
                "error": guard.scrub(guard.last_line(info.get("error")), db) if info.get("error") else None}

    def no_run(run_id: str):
        return HTTPException(status_code=404, detail=f"run {run_id[:80]!r}: no such run in {db.name}")

    @app.get("/api/runs/{run_id}")
    def run(run_id: str):
        """One run: its row (config parsed; a failed run's error as its exception line), evaluations,
        and ranks at every measured step."""
        found = reader().run(run_id)
        if found is None:
            raise no_run(run_id)
        return body({"run": records([public(found["run"])])[0], "evals": records(found["evals"]),
                     "ranks": records(found["ranks"])})

    @app.get("/api/runs/{run_id}/spectrum")
    def spectrum(run_id: str, step: int | None = None, layer: int = 0, site: str = "post", stratum: str = "all"):
        """The eigenvalues (descending) of one spectrum; step defaults to the run's last measured one."""
        with reader() as r:
            if not r.has_run(run_id):
                raise no_run(run_id)
            found = r.spectrum(run_id, step=step, layer=layer, site=site, stratum=stratum)
        if found is None:
            raise HTTPException(status_code=404, detail=f"run {run_id[:80]}: no spectrum at step={step} layer={layer} "
                                                        f"site={site} stratum={stratum}")
        return body(records([found])[0])

    counted: dict = {}  # the last counts read, for while a commit holds the file

    def count_runs() -> None:
        try:
            stamp = store.stamp(db)
            counts = reader(wait_s=0 if counted else store.LOCK_WAIT_S).status_counts()
            counted.update(runs=counts, at=time.time(), stamp=stamp)
        except StoreLocked:
            if not counted:
                raise

    @app.get("/api/status")
    async def status():
        """Runs by status and the runs in flight (from a running `specdb run`'s progress file).
        The counts are read again only when the store file changed; while a commit holds the
        store, the counts read just before it are returned at once (`runs_as_of` says when they
        were read). Cheap enough to answer on the event loop: it never waits behind computing
        requests."""
        try:
            current = store.stamp(db)
        except OSError:
            current = None
        if not counted or counted.get("stamp") != current:
            await run_in_threadpool(count_runs)
        flight, note = read_sidecar(db)
        in_flight = [{"run_id": rid, **info} for rid, info in flight.items()]
        return Response(json.dumps({"runs": counted["runs"], "in_flight": in_flight, "updated": time.time(),
                                    "runs_as_of": counted["at"], "notes": [guard.scrub(note, db)] if note else []}),
                        media_type="application/json")

    @app.post("/api/sql")
    def sql(request: SQLRequest):
        """One query (SELECT, or EXPLAIN of one), read-only, with a time limit covering its encoding,
        a row cap and a byte cap (each reported in `notes` when hit); duplicate column names are
        kept apart (a, a_2)."""
        return Response(sql_body(reader(), request.query, limits), media_type="application/json")

    return app


def sql_body(source: Reader, text: str, limits: ReadLimits) -> bytes:
    """`{"columns", "rows", "notes"}` encoded row by row in the calling thread, stopping at the
    row cap, the byte cap or the deadline (execution and encoding share one time limit)."""
    out: dict = {}

    def consume(cols, rows):
        deadline = Deadline(limits.time_s)
        encoded, size, notes = [], 0, []
        for i, row in enumerate(rows):
            if i == limits.rows:
                notes.append(f"row cap reached: the first {limits.rows} rows are shown (SPECDB_SQL_ROWS raises it)")
                break
            item = json.dumps({c: None if isinstance(v, float) and not math.isfinite(v) else v
                               for c, v in zip(cols, row)}, default=str).encode()
            if size + len(item) > limits.response_bytes:
                notes.append(f"byte cap reached: the first {i} rows ({size / 2**20:.1f} MiB) are shown "
                             "(SPECDB_RESPONSE_MB raises it)")
                break
            encoded.append(item)
            size += len(item) + 1
            if i % 256 == 0:
                deadline.check()
        out.update(cols=cols, rows=encoded, notes=notes)

    source.stream_sql(text, consume)
    return (b'{"columns":' + json.dumps(out["cols"]).encode() + b',"rows":[' + b",".join(out["rows"])
            + b'],"notes":' + json.dumps(out["notes"]).encode() + b"}")
