"""`BodySizeLimit`: the request-body cap, for declared and streamed (chunked) bodies alike.

A pure ASGI middleware.  A `Content-Length` above the cap (or not a number) is answered 413 before
anything is read; a body without one (`Transfer-Encoding: chunked`) is counted while the
application reads it through `receive`, and reading stops with a 413 as soon as the count passes
the cap, so at most `max_bytes` plus one chunk is ever held in memory.  The 413 is the API's
JSON error (`{"detail": "request body larger than N bytes"}`) with `Connection: close`: the rest
of the body is never read, so the connection cannot carry another request.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed body passes the cap (FastAPI passes it through)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body larger than {max_bytes} bytes",
                         headers={"Connection": "close"})


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and not (declared.isdigit() and int(declared) <= self.max_bytes):
            await self._reject(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:  # read outside the exception handlers: answer here
            if started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = {"detail": f"request body larger than {self.max_bytes} bytes"}
        await JSONResponse(body, 413, headers={"Connection": "close"})(scope, receive, send)
