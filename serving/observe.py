"""`RequestObserver`: request id, metrics, optional access log, and no traceback ever leaks.

A pure ASGI middleware (Starlette's `BaseHTTPMiddleware` costs a task and a queue per request,
a large share of a sub-millisecond request).  Every response carries `x-request-id` (the
caller's, or a new one), which the JSON logs of the request carry too; requests are counted
and timed per route template (bounded label values); an unhandled error is logged and answered
with a plain 500.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import logs, metrics

log = logging.getLogger("serving")


class RequestObserver:
    def __init__(self, app: ASGIApp, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex
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
            metrics.REQUESTS.labels(route, scope["method"], str(status)).inc()
            metrics.REQUEST_LATENCY.labels(route).observe(dt)
            if self.access_log:
                log.info("request", extra={"fields": {"path": scope["path"], "status": status,
                                                      "ms": round(dt * 1000, 3)}})
            logs.request_id.reset(token)
