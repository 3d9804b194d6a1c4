"""What the service trusts and bounds before any answer is computed (README, "Security model").

The `Host` header must name this server (DNS rebinding); a token, when set, comes as
`Authorization: Bearer` or as the cookie a `/?token=…` link sets once; at most `heavy` answers
compute at once (user SQL and predicates on half of the turns); pages load only the server's own
scripts (Content-Security-Policy); error messages name no path of this machine.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from pathlib import Path

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
TOKEN_COOKIE = "specdb_token"
CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "style-src 'self' 'unsafe-inline'; font-src 'self' data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
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


def computes(path: str) -> bool:
    """Requests that compute an answer (everything under /api/ but the cheap status)."""
    return path.startswith("/api/") and path != "/api/status"


def install_turns(app, *, heavy: int, time_s: float, detail) -> dict:
    """The innermost guard: turns for computing requests. `detail(message, status, headers)` makes
    an error response. Returns the gates (their counters), for tests and benchmarks."""
    from fastapi import Request

    # user SQL and predicates (POST /api/sql, any where=) share one half of the turns, so that a
    # flood of them cannot hold up the dashboard's plain questions
    gates = {"untrusted": {"now": 0, "waiting": 0, "limit": max(1, heavy // 2)},
             "plain": {"now": 0, "waiting": 0, "limit": heavy}}

    @app.middleware("http")
    async def gate(request: Request, call_next):
        """At most `heavy` answers compute at once; a few times that many wait for a turn (up to
        the time limit) and the rest get 503 at once. /api/status, the pages and the remembered
        answers never wait here."""
        if not computes(request.url.path):
            return await call_next(request)
        untrusted = request.method == "POST" or "where" in request.query_params
        turn = gates["untrusted" if untrusted else "plain"]
        if turn["waiting"] >= 8 * turn["limit"]:
            return detail("busy: too many requests computing; retry shortly", 503, {"Retry-After": "1"})
        turn["waiting"] += 1
        try:
            deadline = time.monotonic() + time_s
            while turn["now"] >= turn["limit"]:
                if time.monotonic() > deadline:
                    return detail("busy: waited too long for a turn; retry shortly", 503, {"Retry-After": "1"})
                await asyncio.sleep(0.02)
            turn["now"] += 1
        finally:
            turn["waiting"] -= 1
        try:
            return await call_next(request)
        finally:
            turn["now"] -= 1

    return gates


def install_outer(app, *, token: str | None, hosts: set[str], detail) -> None:
    """The guards every request meets before anything else (added after the answer cache, so they
    run before it): security headers, Host, token."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, RedirectResponse

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
