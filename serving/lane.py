"""`ScoringLane`: the thin path for plain scoring requests, beside FastAPI's full one.

A pure ASGI middleware, the innermost of the app's own (inside `RequestObserver` and
`BodySizeLimit`, so request ids, metrics, the access log and the body cap are unchanged).  A
request it takes is a `POST` to one of its paths with `Content-Type: application/json`, no
query string and a body that validates: it reads the body, parses and validates it in one pass
with pydantic-core (`model_validate_json`, the route's own body model), and calls the route's
operation, the very function the FastAPI endpoint calls.  That skips FastAPI's routing,
dependency solving, `json.loads` and second validation pass of the dict, and the exception
and exit-stack layers around every route, which cost a scored request about as much CPU as
the scoring itself.

Everything else goes to the FastAPI app unchanged: other paths and methods, a query string
(`?explain=true`), another content type, every request while the app has
`dependency_overrides` (tests), and any body that does not validate, which is
replayed to FastAPI so that every refusal (422 naming the field, 400 ...) is FastAPI's own
answer.  pydantic-core's JSON parser accepts no body that `json.loads` plus the model's
validation refuses (`tests/integration/serving/test_lane.py` checks that on the fuzz corpus),
so a body the lane takes is one FastAPI would take too, as the same values.  Exceptions of
the operation are answered by the app's own exception handlers (`app.exception_handlers`), as
Starlette's exception middleware answers them; one without a handler reaches
`RequestObserver` (a 500).  OpenAPI is unchanged: the routes stay FastAPI's.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# (request, validated body) -> the response; the route's own operation with its dependencies
Operation = Callable[[Request, Any], Awaitable[Response]]


@dataclass(frozen=True)
class LaneRoute:
    """One route the lane answers: its FastAPI route (for the metrics' route label), the
    body model and the operation."""

    route: BaseRoute
    body: type[BaseModel]
    operation: Operation


class ScoringLane:
    def __init__(self, app: ASGIApp, routes: Mapping[str, LaneRoute]) -> None:
        self.app = app
        self.routes = dict(routes)  # path -> route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self._lane(scope)
        if lane is None:
            await self.app(scope, receive, send)
            return
        body, more = await _read_body(receive)
        if more is not None:  # the client went away mid-body: FastAPI says what it says
            await self.app(scope, _replay(body, receive, more), send)
            return
        try:
            value = lane.body.model_validate_json(body)
        except ValidationError:  # FastAPI's own 422 (or 400), from the same bytes
            await self.app(scope, _replay(body, receive), send)
            return
        scope["route"] = lane.route  # the route template the observer labels metrics with
        request = Request(scope, receive, send)
        try:
            response = await lane.operation(request, value)
        except Exception as exc:  # noqa: BLE001 - answered by the app's handler, or re-raised
            response = await _handled(scope["app"], request, exc)
        await response(scope, receive, send)

    def _lane(self, scope: Scope) -> LaneRoute | None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["query_string"]:
            return None
        lane = self.routes.get(scope["path"])
        if lane is None or scope.get("root_path"):
            return None
        if getattr(scope.get("app"), "dependency_overrides", None):  # FastAPI resolves those
            return None
        for key, value in scope["headers"]:
            if key == b"content-type":
                return lane if value.lower() == b"application/json" else None
        return None


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The whole body, or what came of it and the message that ended it early (a disconnect)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive: Receive, end: Message | None = None) -> Receive:
    """`receive` that answers `body` first (and then `end`, if the body ended early)."""
    pending: list[Message] = [{"type": "http.request", "body": body,
                               "more_body": end is not None}]
    if end is not None:
        pending.append(end)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _handled(app: Any, request: Request, exc: Exception) -> Response:
    """The app's answer to `exc` (its exception handler, looked up as Starlette's exception
    middleware does: an HTTPException's status first, then the class hierarchy), or `exc`."""
    handlers: Mapping[Any, Any] = app.exception_handlers
    handler = handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
    if handler is None:
        handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
    if handler is None:
        raise exc
    response = handler(request, exc)
    if inspect.isawaitable(response):
        response = await response
    return cast(Response, response)
