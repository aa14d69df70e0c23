"""`ScoringService`: what a scoring request does between validation and the response.

Event-time bound, admission (`serving.admission`), the lookup and model through the current
`ModelSet`, the classification of a missed lookup deadline (a saturated event loop is
"overloaded", and so is a missed deadline while Redis still answers a PING at once; a slow
or frozen Redis is "unavailable"), and the prediction log.  One per app, built by
the lifespan and reached by routes through `ServiceDep`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import redis.exceptions
from fastapi import HTTPException

from scoring.models import ModelSet
from scoring.prediction_log import PredictionLog
from scoring.scorer import ScoreResult
from serving.admission import OVERLOAD_REJECTIONS, Admission, LoopLag, Overloaded
from serving.config import ServingSettings
from serving.schemas import TransactionIn

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class ScoringService:
    def __init__(self, settings: ServingSettings, prediction_log: PredictionLog) -> None:
        self.settings = settings
        self.prediction_log = prediction_log
        self.admission = Admission(settings.max_inflight_rows)
        self.loop_lag = LoopLag()

    def check_time(self, txns: list[TransactionIn]) -> None:
        """422 `future` for an event_timestamp beyond the contract's bound."""
        bound = self.settings.max_future_seconds
        limit = datetime.now(UTC) + timedelta(seconds=bound)
        for i, t in enumerate(txns):
            if t.event_timestamp is not None and t.event_timestamp > limit:
                field = "event_timestamp" if len(txns) == 1 else f"transactions.{i}.event_timestamp"
                raise HTTPException(422, [{"field": field, "type": "future",
                                           "message": "event_timestamp lies more than "
                                           f"{bound:.0f}s in the future"}])

    async def score(self, models: ModelSet, txns: list[TransactionIn]) -> list[ScoreResult]:
        """Score `txns` with `models`; Overloaded or a RedisError when that is what happened."""
        self.check_time(txns)
        events = [t.to_event() for t in txns]
        deadline = self.settings.lookup_timeout_s
        with self.admission.admit(len(events)):
            try:
                # the lookup's deadline (SERVING_LOOKUP_TIMEOUT_S) covers the lookup only
                results = (await models.score_async(events)).results
            except (TimeoutError, redis.exceptions.TimeoutError) as exc:
                lag = self.loop_lag.recent_max()
                if lag >= deadline / 2 or await self._redis_answers(models, deadline / 2):
                    # the process was slow, not Redis
                    OVERLOAD_REJECTIONS.labels("saturated").inc()
                    raise Overloaded(f"lookup deadline missed (event loop lag {lag:.3f} s; "
                                     "Redis answers)") from exc
                raise redis.exceptions.TimeoutError(
                    f"online lookup exceeded {deadline} s") from exc
            except REDIS_ERRORS as exc:
                raise redis.exceptions.ConnectionError(str(exc)) from exc
        self.prediction_log.record(results, events)
        return results

    @staticmethod
    async def _redis_answers(models: ModelSet, within_s: float) -> bool:
        """Whether the online store answers a PING within `within_s`: after a missed lookup
        deadline, tells a busy scorer (it does) from a slow or frozen Redis (it does not)."""
        try:
            async with asyncio.timeout(within_s):
                return await models.champion.features.ping_async()
        except Exception:  # noqa: BLE001 - any failure: Redis did not answer
            return False
