"""`create_app(settings)`: the FastAPI scorer.

The lifespan opens the feature store once and loads the verified models (champion, optional
shadow/canary challenger, see `scoring.models`); handlers get the current model set through
`ModelsDep`, and `/admin` (`serving.admin`) reloads, promotes and rolls back without a restart
(`serving.lifecycle`).  With SERVING_API_KEY set, scoring needs it in `X-API-Key` (401).
Errors: 422 naming the field for invalid input, 413 for oversized bodies, 503 with Retry-After
when Redis is unavailable or slower than SERVING_LOOKUP_TIMEOUT_S (the deadline of a request's
online lookup and of /ready's ping), and 503 `{"detail": "overloaded"}` with Retry-After when
the scorer itself has no capacity (`serving.admission`), never a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import redis.exceptions
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from threadpoolctl import threadpool_limits

from scoring.models import ModelSet
from scoring.prediction_log import PredictionLog
from scoring.scorer import ScoreResult
from serving.admin import router as admin_router
from serving.admission import OVERLOAD_REJECTIONS, Admission, LoopLag, Overloaded
from serving.config import ServingSettings
from serving.deps import ModelsDep, require_api_key
from serving.lifecycle import ModelManager
from serving.limits import BodySizeLimit
from serving.observe import RequestObserver
from serving.schemas import (
    SCORING_ERRORS,
    BatchIn,
    BatchOut,
    FeatureValue,
    ScoreOut,
    TransactionIn,
)

log = logging.getLogger("serving")
MAX_LISTED_ERRORS = 50  # a 422 names at most this many problems, then says how many more
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def _out(r: ScoreResult, explain: bool) -> ScoreOut:
    features = None
    if explain:
        features = {
            name: FeatureValue(value=_jsonable(v), age_seconds=r.vector.ages.get(name))
            for name, v in r.vector.values.items()
        }
    return ScoreOut(transaction_id=r.transaction_id, score=r.score, decision=r.decision,
                    model_version=r.model_version, feature_service=r.feature_service,
                    missing_features=r.vector.missing, features=features)


def _field(error: dict[str, Any]) -> str:
    """The dotted path of a validation error: "amount", "transactions.3.amount", "query.explain";
    "body" for the body as a whole (invalid JSON: pydantic's loc is a character position)."""
    if error["type"] == "json_invalid":
        return "body"
    return ".".join(str(p) for p in error["loc"] if p != "body") or "body"


def _jsonable(v: object) -> object:
    return None if isinstance(v, float) and v != v else v  # NaN -> null


def create_app(settings: ServingSettings) -> FastAPI:
    admission = Admission(settings.max_inflight_rows)
    loop_lag = LoopLag()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One request scores a handful of rows: OpenMP thread fan-out only adds latency, and
        # replicas/workers, not threads, are how the scorer scales.
        threadpool_limits(1)
        manager = ModelManager.start(settings)
        app.state.settings, app.state.models = settings, manager
        log.info("models loaded", extra={"fields": manager.current.describe()})
        # every scored request, with its vector (scoring/prediction_log.py); drift vs training
        app.state.prediction_log = PredictionLog.from_settings(
            settings, manager.current.champion.artifact.path)
        # a promotion or rollback moves drift to the new champion's training reference
        manager.listeners.append(
            lambda models: app.state.prediction_log.use_reference(models.champion.artifact.path))
        # Start-up objects (Feast registry, model, libraries) live as long as the process: move
        # them out of the collector's reach, so a full collection is not a latency spike.
        gc.collect()
        gc.freeze()
        tasks = [asyncio.create_task(loop_lag.run())]
        if settings.reload_interval_s > 0 and manager.current.source != "pinned":
            tasks.append(asyncio.create_task(manager.poll()))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        manager.close()
        app.state.prediction_log.close()

    app = FastAPI(title="fraudstream scorer", version="1", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # chunked too
    app.add_middleware(RequestObserver, access_log=settings.access_log)  # outermost

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        found = exc.errors()
        errors = [{"field": _field(e), "message": e["msg"], "type": e["type"]}
                  for e in found[:MAX_LISTED_ERRORS]]
        if len(found) > MAX_LISTED_ERRORS:  # a 1 MB body of unknown keys: no 10 MB answer
            errors.append({"field": "body", "type": "too_many_errors",
                           "message": f"{len(found) - MAX_LISTED_ERRORS} more problems not listed"})
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Exception) -> JSONResponse:
        log.warning("overloaded: %s", exc)
        return JSONResponse({"detail": "overloaded"}, 503,
                            headers={"Retry-After": str(settings.retry_after_seconds)})

    @app.exception_handler(redis.exceptions.RedisError)
    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("online store unavailable: %s", exc)
        return JSONResponse({"detail": "online feature store unavailable"}, 503,
                            headers={"Retry-After": str(settings.retry_after_seconds)})

    def _check_time(txns: list[TransactionIn]) -> None:
        limit = datetime.now(UTC) + timedelta(seconds=settings.max_future_seconds)
        for i, t in enumerate(txns):
            if t.event_timestamp is not None and t.event_timestamp > limit:
                field = "event_timestamp" if len(txns) == 1 else f"transactions.{i}.event_timestamp"
                raise HTTPException(422, [{"field": field, "type": "future",
                                           "message": "event_timestamp lies more than "
                                           f"{settings.max_future_seconds:.0f}s in the future"}])

    async def _score(models: ModelSet, txns: list[TransactionIn]) -> list[ScoreResult]:
        _check_time(txns)
        events = [t.to_event() for t in txns]
        with admission.admit(len(events)):
            try:
                # the lookup's deadline (SERVING_LOOKUP_TIMEOUT_S) covers the lookup only
                results = (await models.score_async(events)).results
            except (TimeoutError, redis.exceptions.TimeoutError) as exc:
                if loop_lag.recent_max() >= settings.lookup_timeout_s / 2:  # we were slow
                    OVERLOAD_REJECTIONS.labels("saturated").inc()
                    raise Overloaded("lookup deadline missed while the event loop lagged "
                                     f"{loop_lag.recent_max():.3f} s") from exc
                raise redis.exceptions.TimeoutError(
                    f"online lookup exceeded {settings.lookup_timeout_s} s") from exc
            except REDIS_ERRORS as exc:
                raise redis.exceptions.ConnectionError(str(exc)) from exc
        app.state.prediction_log.record(results, events)
        return results

    # X-API-Key is declared (and checked) on the scoring routes only when SERVING_API_KEY is
    # set: the published OpenAPI says what this app enforces.
    keyed = [Depends(require_api_key)] if settings.api_key is not None else []

    @app.post("/v1/score", response_model=ScoreOut, dependencies=keyed, responses=SCORING_ERRORS)
    async def score(
        txn: TransactionIn, models: ModelsDep,
        explain: Annotated[bool, Query(description="return every model input")] = False,
    ) -> ScoreOut:
        """Score one transaction as of its `event_timestamp` (default now)."""
        out = _out((await _score(models, [txn]))[0], explain)
        # already validated: skip FastAPI's second validation pass of the return value
        return Response(out.model_dump_json(), media_type="application/json")  # type: ignore[return-value]

    @app.post("/v1/score/batch", response_model=BatchOut, dependencies=keyed,
              responses=SCORING_ERRORS)
    async def score_batch(
        body: BatchIn, models: ModelsDep, explain: Annotated[bool, Query()] = False
    ) -> BatchOut:
        """Score up to SERVING_MAX_BATCH (at most 1,000) transactions with one online lookup."""
        if len(body.transactions) > settings.max_batch:
            raise HTTPException(422, [{"field": "transactions", "type": "too_long",
                                       "message": f"at most {settings.max_batch} transactions "
                                       "per request (SERVING_MAX_BATCH)"}])
        out = BatchOut(results=[_out(r, explain) for r in await _score(models, body.transactions)])
        return Response(out.model_dump_json(), media_type="application/json")  # type: ignore[return-value]

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Model loaded, Redis and the registry reachable; 503 otherwise."""
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

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(admin_router)
    return app
