"""The served models: a champion and an optional challenger, and how traffic reaches them.

* **shadow**: the challenger scores every transaction on the champion's feature vectors (or,
  if it reads another feature service, on its own, looked up concurrently); its results are
  counted and logged but never returned, and its failures never fail the request.
* **canary**: a fixed share of users, chosen by `crc32(user_id) % 10000 < share * 10000`, is
  answered by the challenger (its score, decision and `model_version`).  The split is
  deterministic: a user always meets the same model while the share is unchanged.

When both models read the same feature service they share one `OnlineFeatures`, and each
transaction's features are looked up once.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from feature_repo.contract import TransactionEvent
from scoring import metrics
from scoring.features import FeatureVector
from scoring.registry import Mode
from scoring.scorer import Scorer, ScoreResult

log = logging.getLogger("scoring.models")


def in_canary(user_id: str, share: float) -> bool:
    """Whether `user_id` belongs to the canary share (stable across processes and restarts)."""
    return zlib.crc32(user_id.encode()) % 10_000 < round(share * 10_000)


@dataclass(frozen=True)
class Challenger:
    scorer: Scorer
    mode: Mode
    share: float = 0.0  # canary only


@dataclass(frozen=True)
class Scored:
    results: list[ScoreResult]  # to return, in request order
    shadow: list[ScoreResult] = field(default_factory=list)  # never returned


@dataclass(frozen=True)
class ModelSet:
    """Immutable: a reload builds a new ModelSet and swaps the reference."""

    champion: Scorer
    challenger: Challenger | None = None
    source: str = "registry"  # where the plan came from: registry, pinned or newest

    @property
    def shares_features(self) -> bool:
        return self.challenger is not None and self.challenger.scorer.features is self.champion.features

    def describe(self) -> dict[str, Any]:
        def model(s: Scorer) -> dict[str, Any]:
            return {"version": s.artifact.version, "feature_service": s.artifact.feature_service,
                    "path": str(s.artifact.path)}

        ch = self.challenger
        return {
            "source": self.source,
            "champion": model(self.champion),
            "challenger": None if ch is None
            else {**model(ch.scorer), "mode": ch.mode, "share": ch.share},
        }

    async def score_async(self, txns: Sequence[TransactionEvent]) -> Scored:
        ch = self.challenger
        if ch is None:
            return Scored(await self.champion.score_async(txns))
        if ch.mode == "shadow":
            return await self._shadow(txns, ch.scorer)
        return await self._canary(txns, ch)

    async def _shadow(self, txns: Sequence[TransactionEvent], shadow: Scorer) -> Scored:
        if self.shares_features:
            vectors = await self.champion.vectors_async(txns)
            results = await self.champion.predict_async(txns, vectors)
            return Scored(results, await self._shadow_scores(shadow, txns, vectors, results))
        champ, own = await asyncio.gather(
            self.champion.vectors_async(txns), shadow.vectors_async(txns), return_exceptions=True
        )
        if isinstance(champ, BaseException):
            raise champ
        results = await self.champion.predict_async(txns, champ)
        if isinstance(own, BaseException):
            self._shadow_failed(shadow, own)
            return Scored(results)
        return Scored(results, await self._shadow_scores(shadow, txns, own, results))

    async def _shadow_scores(self, shadow: Scorer, txns: Sequence[TransactionEvent],
                       vectors: list[FeatureVector], champion: list[ScoreResult]
                       ) -> list[ScoreResult]:
        version = shadow.artifact.version
        try:
            out = await shadow.predict_async(txns, vectors, observe=False)
        except Exception as exc:  # noqa: BLE001 - a shadow never fails the request
            self._shadow_failed(shadow, exc)
            return []
        metrics.SHADOW_SCORES.labels(version).inc(len(out))
        diff = metrics.CHALLENGER_SCORE_DIFF.labels(version)
        for s, c in zip(out, champion, strict=True):
            diff.observe(s.score - c.score)
            log.debug("shadow score", extra={"fields": {
                "transaction_id": s.transaction_id, "model_version": version, "score": s.score,
                "decision": s.decision, "champion_score": c.score}})
        return out

    @staticmethod
    def _shadow_failed(shadow: Scorer, exc: BaseException) -> None:
        metrics.SHADOW_ERRORS.labels(shadow.artifact.version).inc()
        log.warning("shadow scoring failed: %s", exc,
                    extra={"fields": {"model_version": shadow.artifact.version}})

    async def _canary(self, txns: Sequence[TransactionEvent], ch: Challenger) -> Scored:
        canary = [in_canary(t.user_id, ch.share) for t in txns]
        main_txns = [t for t, c in zip(txns, canary, strict=True) if not c]
        canary_txns = [t for t, c in zip(txns, canary, strict=True) if c]
        if self.shares_features:
            vectors = await self.champion.vectors_async(txns)
            main_vec = [v for v, c in zip(vectors, canary, strict=True) if not c]
            canary_vec = [v for v, c in zip(vectors, canary, strict=True) if c]
        else:
            main_vec, canary_vec = await asyncio.gather(
                self.champion.vectors_async(main_txns), ch.scorer.vectors_async(canary_txns))
        main = iter(await self.champion.predict_async(main_txns, main_vec))
        tried = iter(await ch.scorer.predict_async(canary_txns, canary_vec))
        metrics.CANARY_REQUESTS.labels(ch.scorer.artifact.version).inc(len(canary_txns))
        return Scored([next(tried) if c else next(main) for c in canary])
