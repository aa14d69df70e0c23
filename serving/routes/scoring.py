"""`POST /v1/score` and `POST /v1/score/batch` (X-API-Key when SERVING_API_KEY is set: the
app adds the check when it includes this router)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response

from scoring.scorer import ScoreResult
from serving.deps import ModelsDep, ServiceDep
from serving.schemas import (
    SCORING_ERRORS,
    BatchIn,
    BatchOut,
    FeatureValue,
    ScoreOut,
    TransactionIn,
)

router = APIRouter(prefix="/v1", tags=["scoring"], responses=SCORING_ERRORS)


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


def _jsonable(v: object) -> object:
    return None if isinstance(v, float) and v != v else v  # NaN -> null


@router.post("/score", response_model=ScoreOut)
async def score(
    txn: TransactionIn, models: ModelsDep, service: ServiceDep,
    explain: Annotated[bool, Query(description="return every model input")] = False,
) -> ScoreOut:
    """Score one transaction as of its `event_timestamp` (default now)."""
    out = _out((await service.score(models, [txn]))[0], explain)
    # already validated: skip FastAPI's second validation pass of the return value
    return Response(out.model_dump_json(), media_type="application/json")  # type: ignore[return-value]


@router.post("/score/batch", response_model=BatchOut)
async def score_batch(
    body: BatchIn, models: ModelsDep, service: ServiceDep,
    explain: Annotated[bool, Query()] = False,
) -> BatchOut:
    """Score up to SERVING_MAX_BATCH (at most 1,000) transactions with one online lookup."""
    limit = service.settings.max_batch
    if len(body.transactions) > limit:
        raise HTTPException(422, [{"field": "transactions", "type": "too_long",
                                   "message": f"at most {limit} transactions "
                                   "per request (SERVING_MAX_BATCH)"}])
    results = await service.score(models, body.transactions)
    out = BatchOut(results=[_out(r, explain) for r in results])
    return Response(out.model_dump_json(), media_type="application/json")  # type: ignore[return-value]
