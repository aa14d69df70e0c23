"""`ScoringService`: what a scoring request does between validation and the response.

Event-time bound, admission (`serving.admission`), the lookup and model through the current
`ModelSet` (and the explanation, under the same admission), the classification of a missed
lookup deadline (a saturated event loop is "overloaded", and so is a deadline missed while
large batches computed in worker threads or while Redis answered the scorer's other reads late
in the wait; otherwise Redis was slow or frozen: "unavailable"), and the prediction log.  One per app, built by the lifespan and reached by
routes through `ServiceDep`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import redis.exceptions
from fastapi import HTTPException

from feature_repo.contract import future_excess_s
from scoring.explain import Explanation, explain_results
from scoring.models import ModelSet
from scoring.prediction_log import PredictionLog
from scoring.scorer import OFFLOAD, ScoreResult
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
        """422 `future` for an event_timestamp beyond the contract's bound (the first one)."""
        bound, now = self.settings.max_future_seconds, datetime.now(UTC)
        times = [t.event_timestamp for t in txns if t.event_timestamp is not None]
        if not times or future_excess_s(max(times), now, bound) is None:
            return  # the latest is within the bound: every one is
        for i, t in enumerate(txns):
            if t.event_timestamp is not None and future_excess_s(t.event_timestamp, now, bound):
                field = "event_timestamp" if len(txns) == 1 else f"transactions.{i}.event_timestamp"
                raise HTTPException(422, [{"field": field, "type": "future",
                                           "message": "event_timestamp lies more than "
                                           f"{bound:.0f}s in the future"}])

    async def score(self, models: ModelSet, txns: list[TransactionIn], explain: bool = False
                    ) -> tuple[list[ScoreResult], list[Explanation | None]]:
        """Score `txns` with `models` (and explain each score if `explain`): the results and
        one explanation per result (all None unless `explain`); Overloaded or a RedisError
        when that is what happened.  The explanation is part of the admitted work: its rows
        hold their admission slot until it is done, so explain traffic is bounded too."""
        self.check_time(txns)
        events = [t.to_event() for t in txns]
        deadline = self.settings.lookup_timeout_s
        started = time.monotonic()
        with self.admission.admit(len(events)):
            try:
                # the lookup's deadline (SERVING_LOOKUP_TIMEOUT_S) covers the lookup only
                results = (await models.score_async(events)).results
            except (TimeoutError, redis.exceptions.TimeoutError) as exc:
                lag = self.loop_lag.recent_max()
                # Redis alive means it answered other reads of this scorer in the last half of
                # this lookup's wait: answers that came just before a freeze prove nothing
                alive_since = max(started, time.monotonic() - deadline / 2)
                if (lag >= deadline / 2 or OFFLOAD.busy_since(started)
                        or models.champion.features.answered_since(alive_since)):
                    # the process was busy (its event loop late, or large batches computing in
                    # threads that share the GIL with it), or Redis answered other reads of
                    # this scorer late in the wait: the deadline went to this scorer's own load
                    # (its lookups queued behind each other), not evidence against Redis
                    OVERLOAD_REJECTIONS.labels("saturated").inc()
                    raise Overloaded(f"lookup deadline missed while busy (event loop lag "
                                     f"{lag:.3f} s, offloaded work {OFFLOAD.running})") from exc
                raise redis.exceptions.TimeoutError(
                    f"online lookup exceeded {deadline} s") from exc
            except REDIS_ERRORS as exc:
                raise redis.exceptions.ConnectionError(str(exc)) from exc
            # logged once scored: an explanation that fails does not unlog a served score
            self.prediction_log.record(results, events)
            explained: list[Explanation | None] = [None] * len(results)
            if explain:
                explained = await explain_results(models, results)
        return results, explained
