"""FastAPI dependencies: the models loaded by the lifespan, and the API-key checks.

All `async def`: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per
request that cost more than the scoring itself.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

from scoring.models import ModelSet
from serving.config import ServingSettings
from serving.lifecycle import ModelManager
from serving.service import ScoringService


async def get_manager(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.models
    return manager


async def get_models(request: Request) -> ModelSet:
    """The model set of this request: read once, so a reload mid-request does not affect it."""
    manager: ModelManager = request.app.state.models
    return manager.current


async def get_service(request: Request) -> ScoringService:
    service: ScoringService = request.app.state.service
    return service


def _settings(request: Request) -> ServingSettings:
    settings: ServingSettings = request.app.state.settings
    return settings


# `X-API-Key`, declared as an OpenAPI security scheme; checked below (absent -> None)
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="SERVING_API_KEY for scoring, SERVING_ADMIN_API_KEY "
                                          "for /admin")
ApiKey = Annotated[str | None, Security(api_key_header)]


def _matches(given: str | None, key: SecretStr) -> bool:
    return given is not None and secrets.compare_digest(
        given.encode(), key.get_secret_value().encode())


async def require_api_key(request: Request, x_api_key: ApiKey) -> None:
    """401 unless `X-API-Key` matches SERVING_API_KEY (no check when that is unset)."""
    key = _settings(request).api_key
    if key is not None and not _matches(x_api_key, key):
        raise HTTPException(401, "missing or invalid API key (X-API-Key)",
                            headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'})


async def require_admin_key(request: Request, x_api_key: ApiKey) -> None:
    """403 unless `X-API-Key` matches SERVING_ADMIN_API_KEY; always 403 when that is unset."""
    key = _settings(request).admin_api_key
    if key is None:
        raise HTTPException(403, "admin API disabled (SERVING_ADMIN_API_KEY is not set)")
    if not _matches(x_api_key, key):
        raise HTTPException(403, "missing or invalid admin API key (X-API-Key)")


ManagerDep = Annotated[ModelManager, Depends(get_manager)]
ModelsDep = Annotated[ModelSet, Depends(get_models)]
ServiceDep = Annotated[ScoringService, Depends(get_service)]
