"""`specdb serve`: the store as a read-only HTTP service (FastAPI), one endpoint per verb.

Every request opens the store read-only (file access and extensions disabled, configuration
locked; the same `--where` checks as the CLI) and retries politely while a driver commits.
Parameters and defaults are the CLI's; so are the error words. Answers are
`{"rows": [...], "notes": [...]}` with exactly the records `specdb query … --format json` prints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel

from spectraldb import queries, store
from spectraldb.errors import SpecError, StoreError, StoreLocked
from spectraldb.progress import read_sidecar

SQL_ROW_CAP = 10_000
SQL_TIME_LIMIT_S = 10.0
CACHE_ENTRIES = 512
MAX_STALE_S = 10.0  # the oldest answer served while its refresh computes (x-specdb-cache: stale)


class Answer(NamedTuple):
    stamp: tuple        # the store's (size, mtimes) when the computation started
    body: bytes
    computed_at: float  # time.monotonic() when it started
log = logging.getLogger("specdb.service")


def records(rows: list[dict]) -> list[dict]:
    """Rows as JSON records: what the CLI's `--format json` prints, with NaN/inf as null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return [{k: clean(v) for k, v in r.items()} for r in json.loads(json.dumps(rows, default=str))]


def _split(values: list[str] | None) -> list[str]:
    return [x.strip() for part in values or [] for x in part.split(",") if x.strip()]


DASHBOARD = Path(__file__).resolve().parent / "dashboard" / "index.html"


def plotly_bundle() -> Path:
    """plotly.js as the `plotly` PyPI package ships it: served by specdb itself, never a CDN."""
    import importlib.util

    spec = importlib.util.find_spec("plotly")  # locate without importing the (large) Python package
    if spec is None or not spec.submodule_search_locations:
        raise StoreError("the dashboard needs the plotly package: pip install plotly")
    return Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"


class SQLRequest(BaseModel):
    query: str


def create_app(db: str | Path, token: str | None = None):
    import duckdb
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    db = Path(db)
    app = FastAPI(title="specdb", version="1", description="Read-only queries over a specdb store: the "
                  "study's questions (β, matched pairs, Δ), runs, spectra and SQL.")

    cache: OrderedDict = OrderedDict()  # (path, params) → Answer
    pending: dict = {}
    refreshing: dict = {}  # (path, params) → the task computing its fresh answer

    async def inner(scope) -> tuple[int, bytes]:
        """Answer a copy of a request's GET through the whole app, past the remembered answers
        (its headers, the token included, are the original request's), collecting the body."""
        sent = {"status": 500, "body": []}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["body"].append(message.get("body", b""))

        await app({**scope, "specdb_refresh": True}, receive, send)
        return sent["status"], b"".join(sent["body"])

    async def refresh(question, scope) -> None:
        try:
            started, stamp = time.monotonic(), store._stamp(db)  # read first: a commit meanwhile → stale again
            status, body = await inner(scope)
            if status == 200:
                remember(question, Answer(stamp, body, started))
            else:  # let the next request meet the error the normal way
                cache.pop(question, None)
        except Exception:  # noqa: BLE001
            cache.pop(question, None)
        finally:
            refreshing.pop(question, None)

    def remember(question, answer) -> None:
        cache[question] = answer
        cache.move_to_end(question)
        while len(cache) > CACHE_ENTRIES:
            cache.popitem(last=False)

    @app.middleware("http")
    async def answers(request: Request, call_next):
        """Answers depend on the store's content only: a GET is answered from memory until the
        file changes (a commit changes its size or mtimes). After a commit the previous answer
        is still served — marked `x-specdb-cache: stale` with its `Age` — while one background
        computation refreshes it, for at most MAX_STALE_S; so a sweep committing every second
        costs each question one computation at a time and no client waits for it.
        `Cache-Control: no-cache` asks for the current answer, computed if need be."""
        path = request.url.path
        if (request.method != "GET" or not path.startswith("/api/") or path == "/api/status"
                or request.scope.get("specdb_refresh")):
            return await call_next(request)
        question = (path, tuple(sorted(request.query_params.multi_items())))
        try:
            stamp = store._stamp(db)
        except OSError:
            return await call_next(request)
        known = cache.get(question)
        if known is not None and known.stamp == stamp:
            cache.move_to_end(question)
            return Response(known.body, media_type="application/json", headers={"x-specdb-cache": "hit"})
        age = time.monotonic() - known.computed_at if known is not None else math.inf
        if age <= MAX_STALE_S and "no-cache" not in request.headers.get("cache-control", "").lower():
            if question not in refreshing:
                refreshing[question] = asyncio.get_running_loop().create_task(refresh(question, dict(request.scope)))
            return Response(known.body, media_type="application/json",
                            headers={"x-specdb-cache": "stale", "age": str(int(age))})
        key = (question, stamp)
        if key in pending:  # the same question is being computed: wait for it rather than compute it again
            body = await asyncio.shield(pending[key])
            if body is not None:
                return Response(body, media_type="application/json", headers={"x-specdb-cache": "shared"})
            return await call_next(request)
        pending[key] = asyncio.get_running_loop().create_future()
        body, started = None, time.monotonic()
        try:
            response = await call_next(request)
            if response.status_code != 200:
                return response
            body = b"".join([chunk async for chunk in response.body_iterator])
            remember(question, Answer(stamp, body, started))
            return Response(body, media_type="application/json")
        finally:
            pending.pop(key).set_result(body)

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"detail": "Authorization: Bearer <token> required"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(SpecError)
    async def bad_input(_request, exc: SpecError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(StoreError)
    async def no_store(_request, exc: StoreError):
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        name = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": f"--{name}: {err.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(duckdb.Error)
    async def query_failed(_request, exc: duckdb.Error):  # the kind only: DuckDB's text can quote values
        return JSONResponse({"detail": f"query failed ({str(exc).split(':', 1)[0]})"}, status_code=400)

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):  # never a traceback in a response
        log.exception("internal error")
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    def answer(fn, *, where=None, include_diverged=False, **kw) -> dict:
        with store.connect(db, read_only=True) as con:
            result = fn(con, include_diverged=include_diverged, **({"where": where} if where is not None else {}),
                        **kw)
            n = 0 if include_diverged else queries.excluded_diverged(con, where)
        notes = list(result.notes)
        if n:
            notes.append(f"excluded {n} diverged run{'s' if n > 1 else ''} (--include-diverged to keep them)")
        return {"rows": records(result.rows), "notes": notes}

    @app.get("/api/beta")
    def beta(stratum: str = "all", site: str = "post", include_diverged: bool = False,
             by: list[str] | None = Query(None), metric: str | None = None, window: int | None = None,
             layer: str = "agg", step: int | None = None, where: str | None = None):
        """β of rank vs FFN width per group (as `specdb query beta`)."""
        return answer(queries.beta, stratum=stratum, site=site, include_diverged=include_diverged,
                      by=queries.check_factors(_split(by)), metric=metric, window=window, layer=layer, step=step,
                      where=where)

    @app.get("/api/dynamics")
    def dynamics(stratum: str = "all", site: str = "post", include_diverged: bool = False, where: str | None = None):
        return answer(queries.dynamics, stratum=stratum, site=site, include_diverged=include_diverged, where=where)

    @app.get("/api/depth")
    def depth(stratum: str = "all", site: str = "post", include_diverged: bool = False, where: str | None = None):
        return answer(queries.depth, stratum=stratum, site=site, include_diverged=include_diverged, where=where)

    @app.get("/api/matched")
    def matched(stratum: str = "all", site: str = "post", include_diverged: bool = False,
                by: list[str] | None = Query(None), metric: str = "hard", ppl_tol: float = 0.03,
                min_dbeta: float = 0.1, where: str | None = None):
        queries.check_metric(metric)
        return answer(queries.matched, stratum=stratum, site=site, include_diverged=include_diverged,
                      by=queries.check_factors(_split(by) or ["optimizer,steps"]), metric=metric, ppl_tol=ppl_tol,
                      min_dbeta=min_dbeta, where=where)

    @app.get("/api/delta")
    def delta(arch: str = "n_head", baseline: str = "adamw", reference: str | None = None,
              stratum: list[str] | None = Query(None), site: str = "post", include_diverged: bool = False,
              where: str | None = None):
        strata = _split(stratum) or ["all", "head", "mid", "tail"]
        return answer(lambda con, include_diverged, where=None: queries.delta(
            con, arch, baseline=baseline, reference=reference, site=site, strata=strata,
            include_diverged=include_diverged, where=where), include_diverged=include_diverged, where=where)

    @app.get("/api/renyi")
    def renyi(ffn_mult: float, step: int | None = None, stratum: str = "all", include_diverged: bool = False):
        return answer(queries.renyi, ffn_mult=ffn_mult, step=step, stratum=stratum, include_diverged=include_diverged)

    @app.get("/api/scaling")
    def scaling(stratum: str = "all", site: str = "post", include_diverged: bool = False,
                by: list[str] | None = Query(None), where: str | None = None):
        """The study's main figure as data: per group, the seed-mean points, β with its interval
        and the fitted line with its 95% band, for hard and soft rank (as `specdb plot scaling`)."""
        from spectraldb.plots import scaling_series

        with store.connect(db, read_only=True) as con:
            data, notes = scaling_series(con, stratum, site, include_diverged=include_diverged, where=where,
                                         by=queries.check_factors(_split(by)))
        return {"series": json.loads(json.dumps(data)), "notes": notes}

    @app.get("/", include_in_schema=False)
    def dashboard():
        from fastapi.responses import HTMLResponse

        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js():
        from fastapi.responses import FileResponse

        return FileResponse(plotly_bundle(), media_type="application/javascript")

    @app.get("/api/runs")
    def runs(status: str | None = None, optimizer: str | None = None, where: str | None = None,
             limit: int = Query(100, ge=1, le=10_000), offset: int = Query(0, ge=0)):
        """Runs with their factors and final perplexity, filtered and paged."""
        with store.connect(db, read_only=True) as con:
            clause = queries.check_where(con, where)
            sql = f"""SELECT run_id, optimizer, optimizer_name, ffn_mult, ffn_width, d_model, n_layer, n_head, seed,
                             steps, status, final_val_ppl AS val_ppl, protocol, duration_s
                      FROM runs WHERE (? IS NULL OR status = ?) AND (? IS NULL OR optimizer = ?) AND {clause}
                      ORDER BY optimizer, ffn_mult, seed, run_id LIMIT ? OFFSET ?"""
            cur = con.execute(sql, [status, status, optimizer, optimizer, limit, offset])
            cols = [d[0] for d in cur.description]
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
            total = con.execute(f"SELECT count(*) FROM runs WHERE (? IS NULL OR status = ?) AND "
                                f"(? IS NULL OR optimizer = ?) AND {clause}",
                                [status, status, optimizer, optimizer]).fetchone()[0]
        return {"rows": records(rows), "total": total, "limit": limit, "offset": offset}

    def _run_or_404(con, run_id: str) -> dict:
        from fastapi import HTTPException

        cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
        row = cur.fetchone()
        if row is None:
            raise HTTPException(status_code=404, detail=f"run {run_id!r}: no such run in {db.name}")
        return dict(zip([d[0] for d in cur.description], row))

    @app.get("/api/runs/{run_id}")
    def run(run_id: str):
        """One run: its row (config parsed), evaluations, and ranks at every measured step."""
        with store.connect(db, read_only=True) as con:
            info = _run_or_404(con, run_id)
            info["config"] = json.loads(info["config"]) if info.get("config") else None
            evals = con.execute("SELECT step, train_loss, val_loss, val_ppl FROM evals WHERE run_id = ? ORDER BY step",
                                [run_id]).fetchall()
            ranks = con.execute("""SELECT step, layer, site, stratum, n_tokens, soft_rank, hard_rank FROM ranks
                                   WHERE run_id = ? ORDER BY step, layer, site, stratum""", [run_id]).fetchall()
        return {"run": records([info])[0],
                "evals": records([dict(zip(("step", "train_loss", "val_loss", "val_ppl"), e)) for e in evals]),
                "ranks": records([dict(zip(("step", "layer", "site", "stratum", "n_tokens", "soft_rank",
                                            "hard_rank"), r)) for r in ranks])}

    @app.get("/api/runs/{run_id}/spectrum")
    def spectrum(run_id: str, step: int | None = None, layer: int = 0, site: str = "post", stratum: str = "all"):
        """The eigenvalues (descending) of one spectrum; step defaults to the run's last measured one."""
        from fastapi import HTTPException

        queries.check_site(site)
        queries.check_strata(stratum)
        with store.connect(db, read_only=True) as con:
            _run_or_404(con, run_id)
            row = con.execute("""SELECT step, n_tokens, n_dim, skipped, min_eigenvalue, eigenvalues FROM spectra
                                 WHERE run_id = ? AND layer = ? AND site = ? AND stratum = ?
                                   AND step = coalesce(?, (SELECT max(step) FROM spectra WHERE run_id = ?))""",
                              [run_id, layer, site, stratum, step, run_id]).fetchone()
        if row is None:
            raise HTTPException(status_code=404, detail=f"run {run_id}: no spectrum at step={step} layer={layer} "
                                                        f"site={site} stratum={stratum}")
        keys = ("step", "n_tokens", "n_dim", "skipped", "min_eigenvalue", "eigenvalues")
        return records([dict(zip(keys, row))])[0]

    counted: dict = {}  # the last counts read, for while a commit holds the file

    @app.get("/api/status")
    def status():
        """Runs by status and the runs in flight (from a running `specdb run`'s progress file).
        While a commit holds the store, the counts read just before it are returned at once
        (`runs_as_of` says when they were read) rather than waiting for the commit."""
        try:
            with store.connect(db, read_only=True, wait_s=0 if counted else store.LOCK_WAIT_S) as con:
                counts = dict(con.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
            counted.update(runs=counts, at=time.time())
        except StoreLocked:
            counts = counted["runs"]
        in_flight = [{"run_id": rid, **info} for rid, info in read_sidecar(db).items()]
        return {"runs": counts, "in_flight": in_flight, "updated": time.time(), "runs_as_of": counted["at"]}

    @app.post("/api/sql")
    def sql(body: SQLRequest):
        """One SELECT (or EXPLAIN), read-only, with a time limit and a row cap (both reported when hit)."""
        cols, rows, notes = run_limited_sql(db, body.query)
        return {"columns": cols, "rows": records(rows), "notes": notes}

    return app


def run_limited_sql(db, text: str, row_cap: int = SQL_ROW_CAP, time_limit_s: float = SQL_TIME_LIMIT_S):
    """`specdb sql`'s checks, plus an interrupt after `time_limit_s` and at most `row_cap` rows."""
    import duckdb

    from spectraldb.sqlshell import check_statement

    with store.connect(db, read_only=True) as con:
        check_statement(con, text)
        timer = threading.Timer(time_limit_s, con.interrupt)
        timer.start()
        try:
            cur = con.execute(text)
            cols = [d[0] for d in cur.description] if cur.description else []
            fetched = cur.fetchmany(row_cap + 1)
        except duckdb.InterruptException:
            raise SpecError(f"sql: stopped after the time limit of {time_limit_s:g} s") from None
        except duckdb.Error as exc:
            raise SpecError(f"sql: {str(exc).splitlines()[0]}") from None
        finally:
            timer.cancel()
    notes = []
    if len(fetched) > row_cap:
        fetched = fetched[:row_cap]
        notes.append(f"row cap reached: the first {row_cap} rows are shown")
    return cols, [dict(zip(cols, r)) for r in fetched], notes
