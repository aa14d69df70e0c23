"""`RequestObserver`: request id, metrics, optional access log, and no traceback ever leaks.

A pure ASGI middleware (Starlette's `BaseHTTPMiddleware` costs a task and a queue per request,
a large share of a sub-millisecond request).  Every response carries `x-request-id` (the
caller's, or a new one), which the JSON logs of the request carry too; requests are counted
and timed per route template (bounded label values); an unhandled error is logged and answered
with a plain 500.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import Counter, Histogram
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import logs, metrics

log = logging.getLogger("serving")


def _header(scope: Scope, name: bytes) -> str | None:
    """A request header's first value (`name` lower case), without building a Headers."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestObserver:
    def __init__(self, app: ASGIApp, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log
        # the labelled metric children, looked up once per (route, method, status): the label
        # lookup costs more than the increment itself
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def _metrics(self, route: str, method: str, status: int) -> tuple[Counter, Histogram]:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                metrics.REQUESTS.labels(route, method, str(status)),
                metrics.REQUEST_LATENCY.labels(route))
        return children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _header(scope, b"x-request-id") or os.urandom(16).hex()  # 128 random bits
        header = (b"x-request-id", rid.encode("latin-1", "replace"))
        token = logs.request_id.set(rid)
        t0 = time.perf_counter()
        status = 500
        started = False

        async def observed_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:  # noqa: BLE001 - log it, never leak a traceback
            log.exception("unhandled error")
            if started:  # the answer is half sent: nothing better to do than cut it
                raise
            await JSONResponse({"detail": "internal error"}, 500)(scope, receive, observed_send)
        finally:
            dt = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", "unmatched")  # templates only
            count, latency = self._metrics(route, scope["method"], status)
            count.inc()
            latency.observe(dt)
            if self.access_log:
                log.info("request", extra={"fields": {"path": scope["path"], "status": status,
                                                      "ms": round(dt * 1000, 3)}})
            logs.request_id.reset(token)
