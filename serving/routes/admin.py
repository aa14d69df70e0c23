"""`/admin`: inspect, reload, promote and roll back the served models (needs the admin key).

Every change is written to the MLflow model registry (scoring/registry.py: the `champion` and
`challenger` aliases) and then loaded through `ModelManager.reload`, so what serves is always
what the registry says.  This worker reloads at once; every other worker and replica follows
through its poller within `SERVING_RELOAD_INTERVAL_S`.  A version that fails verification, or a
registry that does not answer, is refused with 409 and the models that were serving keep
serving; an unknown version is 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from scoring.artifact import ArtifactError
from scoring.registry import RegistryError, UnknownVersion
from serving.deps import ManagerDep, require_admin_key
from serving.schemas import ErrorOut

_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorOut, "description": "admin API disabled, or X-API-Key is not "
          "SERVING_ADMIN_API_KEY"},
    404: {"model": ErrorOut, "description": "unknown version"},
    409: {"model": ErrorOut, "description": "refused: verification failed or nothing to do; "
          "the models that were serving keep serving"},
}
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key)],
                   responses=_ERRORS)


def _refused(exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 404 if isinstance(exc, UnknownVersion) else 409)


@router.get("/models")
async def models(manager: ManagerDep) -> dict[str, Any]:
    """What serves now, when it was loaded, the last refused reload and the registry."""
    return await manager.status()


@router.post("/reload", response_model=None)
async def reload(manager: ManagerDep) -> dict[str, Any] | JSONResponse:
    """Load what the registry describes now; 409 (old models keep serving) if it fails."""
    try:
        new = await manager.reload()
    except (ArtifactError, RegistryError) as exc:
        return _refused(exc)
    return {"serving": new.describe()}


@router.post("/promote/{version}", response_model=None)
async def promote(version: str, manager: ManagerDep) -> dict[str, Any] | JSONResponse:
    """Verify `version`, make it the registry's champion and serve it."""
    try:
        new = await manager.promote(version)
    except (ArtifactError, RegistryError) as exc:
        return _refused(exc)
    return {"serving": new.describe()}


@router.post("/rollback", response_model=None)
async def rollback(manager: ManagerDep) -> dict[str, Any] | JSONResponse:
    """Return to the previous champion and serve it; 409 if there is none."""
    try:
        new = await manager.rollback()
    except (ArtifactError, RegistryError) as exc:
        return _refused(exc)
    return {"serving": new.describe()}
