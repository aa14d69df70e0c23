"""`create_app(settings)`: the FastAPI scorer, wired from its parts.

The lifespan opens the feature store once and loads the verified models (champion, optional
shadow/canary challenger, see `scoring.models`) into a `ModelManager` that reloads, promotes and
rolls back without a restart (`serving.lifecycle`, `/admin`); it builds the `ScoringService`
(`serving.service`) the scoring routes use.  Routes live on routers (`serving.routes.*`); plain
scoring requests reach the same operations through a thin path (`serving.lane`).  Error
answers in `serving.errors`: 422 naming the field for invalid input, 413 for oversized bodies,
503 with Retry-After when Redis is unavailable or slower than SERVING_LOOKUP_TIMEOUT_S, and 503
`{"detail": "overloaded"}` with Retry-After when the scorer itself has no capacity, never a 500
with a traceback.  With SERVING_API_KEY set, scoring needs it in `X-API-Key` (401).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import Depends, FastAPI
from threadpoolctl import threadpool_limits

from feature_repo.heap import settle_heap
from scoring.prediction_log import PredictionLog
from serving import errors
from serving.config import ServingSettings
from serving.deps import require_api_key
from serving.docs import mount_docs
from serving.lane import ScoringLane
from serving.lifecycle import ModelManager
from serving.limits import BodySizeLimit
from serving.observe import RequestObserver
from serving.routes import admin, health, metrics, scoring
from serving.service import ScoringService

log = logging.getLogger("serving")


def limit_native_threads() -> None:
    """One native (OpenMP, BLAS) thread for the model, on the event loop's thread and on the
    worker threads that run large batches (`scoring.scorer.Offload`, through the loop's default
    executor): one request scores a handful of rows, so a thread fan-out only adds latency and
    CPU, and replicas/workers, not threads, are how the scorer scales.  OpenMP's limit is per
    calling thread, so each worker thread sets it when it starts (without it a 100-row batch
    cost 2-3 ms more CPU on two OpenMP threads unless OMP_NUM_THREADS=1 was set)."""
    threadpool_limits(1)
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
        thread_name_prefix="scoring", initializer=threadpool_limits, initargs=(1,)))


def _lifespan(settings: ServingSettings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limit_native_threads()
        manager = ModelManager.start(settings)
        app.state.settings, app.state.models = settings, manager
        log.info("models loaded", extra={"fields": manager.current.describe()})
        # every scored request, with its vector (scoring/prediction_log.py); drift vs training
        plog = PredictionLog.from_settings(settings, manager.current.champion.artifact.path)
        app.state.service = service = ScoringService(settings, plog)
        # a promotion or rollback moves drift to the new champion's training reference
        manager.listeners.append(lambda models: plog.use_reference(models.champion.artifact.path))
        settle_heap()
        tasks = [asyncio.create_task(service.loop_lag.run())]
        if settings.reload_interval_s > 0 and manager.current.source != "pinned":
            tasks.append(asyncio.create_task(manager.poll()))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        manager.close()
        plog.close()

    return lifespan


def create_app(settings: ServingSettings) -> FastAPI:
    app = FastAPI(title="fraudstream scorer", version="1", lifespan=_lifespan(settings),
                  docs_url=None, redoc_url=None)
    mount_docs(app)  # /docs and /redoc with local assets (no CDN)
    # X-API-Key is declared (and checked) on the scoring routes only when SERVING_API_KEY is
    # set: the published OpenAPI says what this app enforces.
    keyed = [Depends(require_api_key)] if settings.api_key is not None else []
    # plain scoring requests skip FastAPI's routing and dependency layers (serving/lane.py)
    app.add_middleware(ScoringLane, routes=scoring.lane_routes(keyed=bool(keyed)))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # chunked too
    app.add_middleware(RequestObserver, access_log=settings.access_log)  # outermost
    errors.install(app, settings)
    app.include_router(scoring.router, dependencies=keyed)
    scoring.check_lane(keyed)  # every dependency of a lane route is one the lane calls
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(admin.router)
    return app
