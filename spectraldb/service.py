"""`specdb serve`: the store as a read-only HTTP service (FastAPI), one endpoint per verb.

Every request opens the store read-only (file access and extensions disabled, configuration
locked; the same `--where` checks as the CLI) and retries politely while a driver commits.
Parameters and defaults are the CLI's; so are the error words. Answers are
`{"rows": [...], "notes": [...]}` with exactly the records `specdb query … --format json` prints.

What the service trusts and bounds (README, "Security model"): the `Host` header must name this
server (DNS rebinding); a token, when set, comes as `Authorization: Bearer` or as the cookie a
`/?token=…` link sets once; every answer is computed and encoded off the event loop under the
read limits of spectraldb.bounds, with at most `heavy` of them computing at once; pages load only
the server's own scripts (Content-Security-Policy); errors name no path of this machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel

from spectraldb import queries, store
from spectraldb.bounds import SERVICE_TIME_S, Deadline, ReadLimits
from spectraldb.errors import SpecError, StoreError, StoreLocked
from spectraldb.progress import read_sidecar

CACHE_ENTRIES = 512
MAX_STALE_S = 10.0  # the oldest answer served while its refresh computes (x-specdb-cache: stale)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
TOKEN_COOKIE = "specdb_token"
CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "style-src 'self' 'unsafe-inline'; font-src 'self' data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


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


STATIC = Path(__file__).resolve().parent / "dashboard"
DASHBOARD = STATIC / "index.html"


def _package_file(package: str, *parts: str, hint: str) -> Path:
    """A file shipped inside an installed package, located without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(hint)
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def plotly_bundle() -> Path:
    """plotly.js as the `plotly` PyPI package ships it: served by specdb itself, never a CDN."""
    return _package_file("plotly", "package_data", "plotly.min.js",
                         hint="the dashboard needs the plotly package: pip install plotly")


def swagger_asset(name: str) -> Path:
    """Swagger UI as the `fastapi-offline` PyPI package ships it: /docs works offline."""
    return _package_file("fastapi_offline", "static", name,
                         hint="/docs needs the fastapi-offline package: pip install fastapi-offline")


_ABSOLUTE = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/:]+/)+([^\s'\"/:]*)")


def scrub(text: str, db: Path) -> str:
    """A message without this machine's absolute paths: the store by its name, others by theirs."""
    for full in {str(db.resolve()), str(db)}:
        text = text.replace(full, db.name)
    return _ABSOLUTE.sub(lambda m: m.group(1) or "…", text)


def last_line(error: str | None) -> str | None:
    """A failed run's error as an API client gets it: the exception line of its traceback."""
    lines = [x.strip() for x in (error or "").strip().splitlines() if x.strip()]
    return lines[-1] if lines else error


def host_allowed(header: str, allowed: set[str]) -> bool:
    """`Host` is one of the allowed names, with or without a port."""
    name = header.strip().lower()
    if name.startswith("["):
        name = name[: name.find("]") + 1] if "]" in name else ""
    elif name.count(":") == 1:
        name, port = name.split(":")
        if not port.isdigit():
            return False
    return bool(name) and name in allowed


class SQLRequest(BaseModel):
    query: str


def create_app(db: str | Path, token: str | None = None, allowed_hosts=(), limits: ReadLimits | None = None):
    """The app for one store. `allowed_hosts`: names besides the loopback ones that clients may use
    in `Host` (those of a non-loopback `--host`); `limits`: the read limits (spectraldb.bounds)."""
    import duckdb
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

    db = Path(db)
    limits = limits or ReadLimits.from_env(SERVICE_TIME_S)
    hosts = {h.lower() for h in (*LOOPBACK_NAMES, *allowed_hosts)}
    app = FastAPI(title="specdb", version="1", docs_url=None, redoc_url=None,
                  description="Read-only queries over a specdb store: the study's questions (β, matched pairs, Δ), "
                              "runs, spectra and SQL.")

    cache: OrderedDict = OrderedDict()  # (path, params) → Answer
    pending: dict = {}
    refreshing: dict = {}  # (path, params) → the task computing its fresh answer
    # user SQL and predicates (POST /api/sql, any where=) share one half of the turns, so that a
    # flood of them cannot hold up the dashboard's plain questions
    gates = {"untrusted": {"now": 0, "waiting": 0, "limit": max(1, limits.heavy // 2)},
             "plain": {"now": 0, "waiting": 0, "limit": limits.heavy}}

    def detail(message: str, status: int, headers: dict | None = None):
        return JSONResponse({"detail": scrub(message, db)}, status_code=status, headers=headers)

    def body(payload) -> Response:
        """An answer encoded here, in the worker thread (never on the event loop), within the byte cap."""
        data = json.dumps(payload, default=str, allow_nan=False).encode()
        if len(data) > limits.response_bytes:
            raise SpecError(f"the answer is {len(data) / 2**20:.1f} MiB, over the {limits.response_bytes / 2**20:g} MiB "
                            "cap; narrow it (where=, limit=) or raise SPECDB_RESPONSE_MB")
        return Response(data, media_type="application/json")

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
            status, answer_body = await inner(scope)
            if status == 200:
                remember(question, Answer(stamp, answer_body, started))
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

    def heavy(request: Request) -> bool:
        path = request.url.path
        return path.startswith("/api/") and path != "/api/status"

    @app.middleware("http")
    async def gate(request: Request, call_next):
        """At most `limits.heavy` answers compute at once; a few times that many wait for a turn
        (up to the time limit) and the rest get 503 at once. /api/status, the pages and the
        remembered answers never wait here."""
        if not heavy(request):
            return await call_next(request)
        untrusted = request.method == "POST" or "where" in request.query_params
        gate_ = gates["untrusted" if untrusted else "plain"]
        if gate_["waiting"] >= 8 * gate_["limit"]:
            return detail("busy: too many requests computing; retry shortly", 503, {"Retry-After": "1"})
        gate_["waiting"] += 1
        try:
            deadline = time.monotonic() + limits.time_s
            while gate_["now"] >= gate_["limit"]:
                if time.monotonic() > deadline:
                    return detail("busy: waited too long for a turn; retry shortly", 503, {"Retry-After": "1"})
                await asyncio.sleep(0.02)
            gate_["now"] += 1
        finally:
            gate_["waiting"] -= 1
        try:
            return await call_next(request)
        finally:
            gate_["now"] -= 1

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
            shared = await asyncio.shield(pending[key])
            if shared is not None:
                return Response(shared, media_type="application/json", headers={"x-specdb-cache": "shared"})
            return await call_next(request)
        pending[key] = asyncio.get_running_loop().create_future()
        computed, started = None, time.monotonic()
        try:
            response = await call_next(request)
            if response.status_code != 200:
                return response
            computed = b"".join([chunk async for chunk in response.body_iterator])
            remember(question, Answer(stamp, computed, started))
            return Response(computed, media_type="application/json")
        finally:
            pending.pop(key).set_result(computed)

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        """The token as a header (API clients) or as the cookie that opening `/?token=…` once sets
        (browsers; it is then redirected away so the token leaves the address bar)."""
        if token is None:
            return await call_next(request)
        expected = token.encode()
        given = request.headers.get("authorization", "")
        if given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), expected):
            return await call_next(request)
        if secrets.compare_digest(request.cookies.get(TOKEN_COOKIE, "").encode(), expected):
            return await call_next(request)
        offered = request.query_params.get("token")
        if request.url.path == "/" and offered is not None and secrets.compare_digest(offered.encode(), expected):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
            return response
        return detail("Authorization: Bearer <token> required (a browser opens /?token=<token> once)", 401)

    @app.middleware("http")
    async def trusted_host(request: Request, call_next):
        """DNS rebinding: a page on another origin whose name resolves to this machine sends its
        own name as `Host`. Only this server's names are answered; anything else gets 400."""
        if not host_allowed(request.headers.get("host", ""), hosts):
            return JSONResponse({"detail": "Host header not allowed (specdb serve --allowed-host NAME)"},
                                status_code=400)
        return await call_next(request)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    @app.exception_handler(SpecError)
    async def bad_input(_request, exc: SpecError):
        return detail(str(exc), 400)

    @app.exception_handler(StoreError)
    async def no_store(_request, exc: StoreError):
        return detail(str(exc), 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        name = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        return detail(f"--{name}: {err.get('msg', 'invalid')}", 422)

    @app.exception_handler(duckdb.Error)
    async def query_failed(_request, exc: duckdb.Error):  # the kind only: DuckDB's text can quote values
        if isinstance(exc, duckdb.OutOfMemoryException):
            return detail("query failed (out of memory; SPECDB_READ_MEMORY_MB raises the reader's limit)", 400)
        return detail(f"query failed ({str(exc).split(':', 1)[0][:80]})", 400)

    @app.exception_handler(MemoryError)
    async def no_memory(_request, exc: MemoryError):
        return detail("out of memory: the answer does not fit this server's memory cap (SPECDB_PROCESS_MEMORY_MB)", 400)

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):  # never a traceback in a response
        log.error("internal error (%s)", type(exc).__name__)
        return detail(f"internal error ({type(exc).__name__})", 500)

    def reader():
        return store.connect(db, read_only=True, time_limit_s=limits.time_s)

    def answer(fn, *, where=None, include_diverged=False, **kw) -> Response:
        with reader() as con:
            result = fn(con, include_diverged=include_diverged, **({"where": where} if where is not None else {}),
                        **kw)
            n = 0 if include_diverged else queries.excluded_diverged(con, where)
        notes = list(result.notes)
        if n:
            notes.append(f"excluded {n} diverged run{'s' if n > 1 else ''} (--include-diverged to keep them)")
        return body({"rows": records(result.rows), "notes": notes})

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

        with reader() as con:
            data, notes = scaling_series(con, stratum, site, include_diverged=include_diverged, where=where,
                                         by=queries.check_factors(_split(by)))
        return body({"series": json.loads(json.dumps(data)), "notes": notes})

    @app.get("/", include_in_schema=False)
    def dashboard():
        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))

    @app.get("/docs", include_in_schema=False)
    def docs():
        return HTMLResponse((STATIC / "docs.html").read_text(encoding="utf-8"))

    static = {"plotly.min.js": plotly_bundle, "dashboard.js": lambda: STATIC / "dashboard.js",
              "docs.js": lambda: STATIC / "docs.js", "swagger-ui-bundle.js": lambda: swagger_asset("swagger-ui-bundle.js"),
              "swagger-ui.css": lambda: swagger_asset("swagger-ui.css")}

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str):
        from fastapi import HTTPException

        if name not in static:
            raise HTTPException(status_code=404, detail="no such file")
        kind = "text/css" if name.endswith(".css") else "application/javascript"
        return FileResponse(static[name](), media_type=kind)

    @app.get("/api/runs")
    def runs(status: str | None = None, optimizer: str | None = None, where: str | None = None,
             limit: int = Query(100, ge=1, le=10_000), offset: int = Query(0, ge=0)):
        """Runs with their factors and final perplexity, filtered and paged."""
        with reader() as con:
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
        return body({"rows": records(rows), "total": total, "limit": limit, "offset": offset})

    def _run_or_404(con, run_id: str) -> dict:
        from fastapi import HTTPException

        cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
        row = cur.fetchone()
        if row is None:
            raise HTTPException(status_code=404, detail=f"run {run_id[:80]!r}: no such run in {db.name}")
        return dict(zip([d[0] for d in cur.description], row))

    def _public(info: dict) -> dict:
        """A run row as the API shows it: the error's exception line, paths by their names only
        (the full traceback stays in the store, for `specdb status` and SQL)."""
        config = json.loads(info["config"]) if info.get("config") else None
        if config:
            for section, key in (("data", "corpus"), ("checkpoint", "dir")):
                if isinstance(config.get(section), dict) and isinstance(config[section].get(key), str):
                    config[section][key] = Path(config[section][key]).name
        return {**info, "config": config, "corpus": Path(info["corpus"]).name if info.get("corpus") else None,
                "error": scrub(last_line(info.get("error")), db) if info.get("error") else None}

    @app.get("/api/runs/{run_id}")
    def run(run_id: str):
        """One run: its row (config parsed; a failed run's error as its exception line), evaluations,
        and ranks at every measured step."""
        with reader() as con:
            info = _public(_run_or_404(con, run_id))
            evals = con.execute("SELECT step, train_loss, val_loss, val_ppl FROM evals WHERE run_id = ? ORDER BY step",
                                [run_id]).fetchall()
            ranks = con.execute("""SELECT step, layer, site, stratum, n_tokens, soft_rank, hard_rank FROM ranks
                                   WHERE run_id = ? ORDER BY step, layer, site, stratum""", [run_id]).fetchall()
        return body({"run": records([info])[0],
                     "evals": records([dict(zip(("step", "train_loss", "val_loss", "val_ppl"), e)) for e in evals]),
                     "ranks": records([dict(zip(("step", "layer", "site", "stratum", "n_tokens", "soft_rank",
                                                 "hard_rank"), r)) for r in ranks])})

    @app.get("/api/runs/{run_id}/spectrum")
    def spectrum(run_id: str, step: int | None = None, layer: int = 0, site: str = "post", stratum: str = "all"):
        """The eigenvalues (descending) of one spectrum; step defaults to the run's last measured one."""
        from fastapi import HTTPException

        queries.check_site(site)
        queries.check_strata(stratum)
        with reader() as con:
            _run_or_404(con, run_id)
            row = con.execute("""SELECT step, n_tokens, n_dim, skipped, min_eigenvalue, eigenvalues FROM spectra
                                 WHERE run_id = ? AND layer = ? AND site = ? AND stratum = ?
                                   AND step = coalesce(?, (SELECT max(step) FROM spectra WHERE run_id = ?))""",
                              [run_id, layer, site, stratum, step, run_id]).fetchone()
        if row is None:
            raise HTTPException(status_code=404, detail=f"run {run_id[:80]}: no spectrum at step={step} layer={layer} "
                                                        f"site={site} stratum={stratum}")
        keys = ("step", "n_tokens", "n_dim", "skipped", "min_eigenvalue", "eigenvalues")
        return body(records([dict(zip(keys, row))])[0])

    counted: dict = {}  # the last counts read, for while a commit holds the file

    def count_runs() -> None:
        try:
            stamp = store._stamp(db)
            with store.connect(db, read_only=True, wait_s=0 if counted else store.LOCK_WAIT_S,
                               time_limit_s=limits.time_s) as con:
                counts = dict(con.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
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
            current = store._stamp(db)
        except OSError:
            current = None
        if not counted or counted.get("stamp") != current:
            await run_in_threadpool(count_runs)
        counts = counted["runs"]
        flight, note = read_sidecar(db)
        in_flight = [{"run_id": rid, **info} for rid, info in flight.items()]
        return Response(json.dumps({"runs": counts, "in_flight": in_flight, "updated": time.time(),
                                     "runs_as_of": counted["at"], "notes": [scrub(note, db)] if note else []}),
                        media_type="application/json")

    @app.post("/api/sql")
    def sql(request: SQLRequest):
        """One query (SELECT, or EXPLAIN of one), read-only, with a time limit covering its encoding,
        a row cap and a byte cap (each reported in `notes` when hit); duplicate column names are
        kept apart (a, a_2)."""
        return Response(sql_body(db, request.query, limits), media_type="application/json")

    return app


def sql_body(db, text: str, limits: ReadLimits) -> bytes:
    """`{"columns", "rows", "notes"}` encoded row by row in the calling thread, stopping at the
    row cap, the byte cap or the deadline (execution and encoding share one time limit)."""
    from spectraldb.sqlshell import run_sql

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

    run_sql(db, text, limits.time_s, consume)
    return (b'{"columns":' + json.dumps(out["cols"]).encode() + b',"rows":[' + b",".join(out["rows"])
            + b'],"notes":' + json.dumps(out["notes"]).encode() + b"}")
