"""Remembered answers: a GET is answered from memory until the store file changes.

A commit changes the file's size or mtimes (`spectraldb.store.stamp`). After a commit the
previous answer is still served — marked `x-specdb-cache: stale` with its `Age` — while one
background computation refreshes it, for at most MAX_STALE_S; so a sweep committing every second
costs each question one computation at a time and no client waits for it. `Cache-Control:
no-cache` asks for the current answer, computed if need be.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from spectraldb import store
from spectraldb.service.guard import computes

CACHE_ENTRIES = 512
MAX_STALE_S = 10.0  # the oldest answer served while its refresh computes (x-specdb-cache: stale)


class CachedAnswer(NamedTuple):
    stamp: tuple        # the store's (size, mtimes) when the computation started
    body: bytes
    computed_at: float  # time.monotonic() when it started


class AnswerCache:
    def __init__(self, db: Path):
        self.db = db
        self.entries: OrderedDict = OrderedDict()  # (path, params) → CachedAnswer
        self.pending: dict = {}                     # (question, stamp) → future of the body computing
        self.refreshing: dict = {}                  # question → the task computing its fresh answer

    def remember(self, question, answer: CachedAnswer) -> None:
        self.entries[question] = answer
        self.entries.move_to_end(question)
        while len(self.entries) > CACHE_ENTRIES:
            self.entries.popitem(last=False)

    async def _inner(self, app, scope) -> tuple[int, bytes]:
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

    async def _refresh(self, app, question, scope) -> None:
        try:
            started, stamp = time.monotonic(), store.stamp(self.db)  # read first: a commit meanwhile → stale again
            status, body = await self._inner(app, scope)
            if status == 200:
                self.remember(question, CachedAnswer(stamp, body, started))
            else:  # let the next request meet the error the normal way
                self.entries.pop(question, None)
        except Exception:  # noqa: BLE001
            self.entries.pop(question, None)
        finally:
            self.refreshing.pop(question, None)

    def install(self, app) -> None:
        from fastapi import Request
        from fastapi.responses import Response

        @app.middleware("http")
        async def answers(request: Request, call_next):
            if request.method != "GET" or not computes(request.url.path) or request.scope.get("specdb_refresh"):
                return await call_next(request)
            question = (request.url.path, tuple(sorted(request.query_params.multi_items())))
            try:
                stamp = store.stamp(self.db)
            except OSError:
                return await call_next(request)
            known = self.entries.get(question)
            if known is not None and known.stamp == stamp:
                self.entries.move_to_end(question)
                return Response(known.body, media_type="application/json", headers={"x-specdb-cache": "hit"})
            age = time.monotonic() - known.computed_at if known is not None else math.inf
            if age <= MAX_STALE_S and "no-cache" not in request.headers.get("cache-control", "").lower():
                if question not in self.refreshing:
                    self.refreshing[question] = asyncio.get_running_loop().create_task(
                        self._refresh(app, question, dict(request.scope)))
                return Response(known.body, media_type="application/json",
                                headers={"x-specdb-cache": "stale", "age": str(int(age))})
            key = (question, stamp)
            if key in self.pending:  # the same question is being computed: wait for it rather than compute it again
                shared = await asyncio.shield(self.pending[key])
                if shared is not None:
                    return Response(shared, media_type="application/json", headers={"x-specdb-cache": "shared"})
                return await call_next(request)
            self.pending[key] = asyncio.get_running_loop().create_future()
            computed, started = None, time.monotonic()
            try:
                response = await call_next(request)
                if response.status_code != 200:
                    return response
                computed = b"".join([chunk async for chunk in response.body_iterator])
                self.remember(question, CachedAnswer(stamp, computed, started))
                return Response(computed, media_type="application/json")
            finally:
                self.pending.pop(key).set_result(computed)
