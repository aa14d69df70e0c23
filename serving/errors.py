"""The app's error answers: 422 naming each field, 503 overloaded, 503 feature store
unavailable (both with Retry-After); `install(app, settings)` registers them."""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serving.admission import Overloaded
from serving.config import ServingSettings

log = logging.getLogger("serving")
MAX_LISTED_ERRORS = 50  # a 422 names at most this many problems, then says how many more


def field_of(error: Any) -> str:
    """The dotted path of a validation error: "amount", "transactions.3.amount", "query.explain";
    "body" for the body as a whole (invalid JSON: pydantic's loc is a character position)."""
    if error["type"] == "json_invalid":
        return "body"
    return ".".join(str(p) for p in error["loc"] if p != "body") or "body"


def install(app: FastAPI, settings: ServingSettings) -> None:
    retry = {"Retry-After": str(settings.retry_after_seconds)}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        found = exc.errors()
        errors = [{"field": field_of(e), "message": e["msg"], "type": e["type"]}
                  for e in found[:MAX_LISTED_ERRORS]]
        if len(found) > MAX_LISTED_ERRORS:  # a 1 MB body of unknown keys: no 10 MB answer
            errors.append({"field": "body", "type": "too_many_errors",
                           "message": f"{len(found) - MAX_LISTED_ERRORS} more problems not listed"})
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Exception) -> JSONResponse:
        log.warning("overloaded: %s", exc)
        return JSONResponse({"detail": "overloaded"}, 503, headers=retry)

    @app.exception_handler(redis.exceptions.RedisError)
    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("online store unavailable: %s", exc)
        return JSONResponse({"detail": "online feature store unavailable"}, 503, headers=retry)
