"""`GET /health` (the process is alive) and `GET /ready` (model, Redis, Feast registry)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.config import ServingSettings
from serving.lifecycle import ModelManager

router = APIRouter(tags=["health"])

# /ready's 503, documented so that the OpenAPI schema lists every status the app returns
READY_RESPONSES: dict[int | str, dict[str, object]] = {
    503: {
        "description": "not ready: no verified model, Redis or the Feast registry did not "
                       "answer (`checks` says which); with Retry-After",
        "content": {"application/json": {"schema": {
            "type": "object", "required": ["ready", "checks"],
            "properties": {"ready": {"type": "boolean"},
                           "checks": {"type": "object",
                                      "additionalProperties": {"type": "boolean"}}}}}},
        "headers": {"Retry-After": {"description": "seconds before asking again",
                                    "schema": {"type": "string"}}},
    },
}


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready", responses=READY_RESPONSES)
async def ready(request: Request) -> JSONResponse:
    """Model loaded, Redis and the registry reachable; 503 otherwise."""
    settings: ServingSettings = request.app.state.settings
    manager: ModelManager | None = getattr(request.app.state, "models", None)
    scorer = None if manager is None else manager.current.champion
    checks = {"model": scorer is not None, "redis": False, "registry": False}
    if scorer is not None:
        try:
            async with asyncio.timeout(settings.lookup_timeout_s):
                checks["redis"] = await scorer.features.ping_async()
        except TimeoutError:
            checks["redis"] = False
        try:
            scorer.features.store.registry.get_feature_service(
                scorer.artifact.feature_service, scorer.features.store.project)
            checks["registry"] = True
        except Exception:  # noqa: BLE001
            checks["registry"] = False
    ok = all(checks.values())
    return JSONResponse({"ready": ok, "checks": checks}, 200 if ok else 503,
                        headers=None if ok else {"Retry-After": str(settings.retry_after_seconds)})
