"""Scoring: transaction -> online feature vector -> model score -> decision.

Shared by the HTTP scorer and the streaming scorer (imported, not called over HTTP), so both
decide identically.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np

from feature_repo.contract import TransactionEvent, request_fields
from scoring import metrics
from scoring.artifact import Artifact
from scoring.compiled import compile_model
from scoring.features import FeatureVector, OnlineFeatures, stacked_inputs

# A batch of this many rows or more assembles its vectors and runs its model in a worker
# thread, so one large batch cannot hold the event loop while other requests' lookups wait.
# A smaller one computes inline: each of its two steps takes less than the interpreter's
# switch interval (5 ms) here, so in a thread it would not let the loop run any sooner
# (the loop waits that long for the GIL whenever it gives it up, at each socket call) and
# would only add the hand-offs (docs/benchmarks.md, sixth session).
OFFLOAD_ROWS = 256


class Offload:
    """Runs large batches' CPU work in worker threads and remembers when it did, so that a
    lookup that missed its deadline meanwhile can be told apart from a slow Redis: the
    threads share the GIL with the event loop, so while one runs, every lookup is slower."""

    def __init__(self) -> None:
        self.running = 0
        self.last_end = 0.0  # time.monotonic() when the last one finished

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        self.running += 1
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self.running -= 1
            self.last_end = time.monotonic()

    def busy_since(self, t: float) -> bool:
        """Whether offloaded work ran at any moment since `t` (time.monotonic())."""
        return self.running > 0 or self.last_end >= t


OFFLOAD = Offload()  # one per process: the threads of every scorer share one GIL

T = TypeVar("T")
Decision = Literal["approve", "review", "decline"]


@dataclass(frozen=True)
class Thresholds:
    review: float
    decline: float

    def decide(self, score: float) -> Decision:
        if score >= self.decline:
            return "decline"
        return "review" if score >= self.review else "approve"


class ScoreResult(NamedTuple):
    """One scored transaction (immutable; a named tuple, built per row in about a fifth of a
    frozen dataclass's time)."""

    transaction_id: str
    score: float
    decision: Decision
    model_version: str
    feature_service: str
    vector: FeatureVector


def thresholds_for(artifact: Artifact, review: float | None, decline: float | None) -> Thresholds:
    meta = artifact.metadata.get("thresholds", {})
    r = review if review is not None else float(meta.get("review", 0.5))
    d = decline if decline is not None else float(meta.get("decline", max(r, 0.9)))
    return Thresholds(review=r, decline=max(d, r))


def model_row(vec: FeatureVector, features: Sequence[str]) -> list[float]:
    """A vector's values in the model's input order as floats, missing (None) as NaN: the row
    the model scores (and `scoring.explain` explains)."""
    values = vec.values
    return [math.nan if (v := values[f]) is None else float(v) for f in features]


def entity_row(txn: TransactionEvent) -> dict[str, Any]:
    """Request data (the contract's request fields) + entity keys of one transaction."""
    row = request_fields(txn.event_timestamp, txn.amount, txn.merchant_id, txn.channel)
    row["user_id"], row["merchant_id"] = txn.user_id, txn.merchant_id
    return row


def _count_outcomes(results: list[ScoreResult]) -> None:
    """The decision and missing-feature counters of a batch, one increment per label (the
    same counts, and children created in the same order, as one increment per row)."""
    decisions: dict[str, int] = {}
    missing: dict[tuple[str, str], int] = {}
    for r in results:
        decisions[r.decision] = decisions.get(r.decision, 0) + 1
        vec = r.vector
        for name in vec.missing:
            key = (name, "stale" if name in vec.stale else "missing")
            missing[key] = missing.get(key, 0) + 1
    for decision, n in decisions.items():
        metrics.DECISIONS.labels(decision).inc(n)
    for labels, n in missing.items():
        metrics.MISSING.labels(*labels).inc(n)


class Scorer:
    """A loaded model bound to its feature service's online features."""

    def __init__(self, artifact: Artifact, features: OnlineFeatures, thresholds: Thresholds):
        if features.output != artifact.features:
            raise ValueError("feature service output does not match the model's inputs")
        self.artifact = artifact
        self.features = features
        self.thresholds = thresholds
        # the compiled tree walker (bit-identical to predict_proba), or None for other models
        self._predict = compile_model(artifact.model)

    def predict(self, txns: Sequence[TransactionEvent], vectors: list[FeatureVector],
                observe: bool = True) -> list[ScoreResult]:
        """Score assembled vectors (one per transaction); `observe=False` records no metrics
        (a shadow model's scores must not count as decisions)."""
        if not txns:
            return []
        t0 = time.perf_counter()
        names = self.features.output  # the model's inputs, in its order (see __init__)
        x = stacked_inputs(vectors, names)
        if x is None:
            x = np.array([model_row(vec, self.artifact.features) for vec in vectors],
                         dtype="float64")
        scores = (self._predict(x) if self._predict is not None
                  else self.artifact.model.predict_proba(x)[:, 1])
        if observe:
            metrics.MODEL_LATENCY.observe(time.perf_counter() - t0)
            metrics.observe_all(metrics.SCORE, scores)
        decide, version, service = (self.thresholds.decide, self.artifact.version,
                                    self.artifact.feature_service)
        out = [ScoreResult(txn.transaction_id, score, decide(score), version, service, vec)
               for txn, vec, score in zip(txns, vectors, np.asarray(scores).tolist(),
                                          strict=True)]
        if observe:
            _count_outcomes(out)
        return out

    def score(self, txns: Sequence[TransactionEvent]) -> list[ScoreResult]:
        """Score a batch with one online lookup per feature view (blocking I/O)."""
        rows = [entity_row(t) for t in txns]
        t0 = time.perf_counter()
        fetched = self.features.fetch(rows)
        metrics.LOOKUP_LATENCY.observe(time.perf_counter() - t0)
        return self.predict(txns, self.features.assemble(rows, fetched))

    async def vectors_async(self, txns: Sequence[TransactionEvent]) -> list[FeatureVector]:
        """The feature service's vectors for a batch, without blocking the event loop on Redis
        (nor on assembly, for a batch of `OFFLOAD_ROWS` or more)."""
        if not txns:
            return []
        rows = [entity_row(t) for t in txns]
        t0 = time.perf_counter()
        fetched = await self.features.fetch_async(rows)
        metrics.LOOKUP_LATENCY.observe(time.perf_counter() - t0)
        if len(rows) >= OFFLOAD_ROWS:
            return await OFFLOAD(self.features.assemble, rows, fetched)
        return self.features.assemble(rows, fetched)

    async def predict_async(self, txns: Sequence[TransactionEvent], vectors: list[FeatureVector],
                            observe: bool = True) -> list[ScoreResult]:
        """`predict`, in a worker thread for a batch of `OFFLOAD_ROWS` or more: the event loop
        keeps serving other requests' lookups meanwhile (the thread still shares the GIL, but
        yields it every switch interval instead of holding the loop for the whole batch)."""
        if len(txns) >= OFFLOAD_ROWS:
            return await OFFLOAD(self.predict, txns, vectors, observe)
        return self.predict(txns, vectors, observe)

    async def score_async(self, txns: Sequence[TransactionEvent]) -> list[ScoreResult]:
        """Score a batch without blocking the event loop on Redis."""
        return await self.predict_async(txns, await self.vectors_async(txns))
