"""`POST /v1/score` and `POST /v1/score/batch` (X-API-Key when SERVING_API_KEY is set: the
app adds the check when it includes this router)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response

from scoring.explain import TOP_REASONS
from scoring.explain import Explanation as RowExplanation
from scoring.scorer import ScoreResult
from serving.deps import ModelsDep, ServiceDep
from serving.schemas import (
    SCORING_ERRORS,
    BatchIn,
    BatchOut,
    Explanation,
    FeatureValue,
    Reason,
    ScoreOut,
    TransactionIn,
)

router = APIRouter(prefix="/v1", tags=["scoring"], responses=SCORING_ERRORS)


EXPLAIN_DOC = ("return every model input with its value and age, and the explanation: each "
               f"input's contribution to the score and the top {TOP_REASONS} reasons (TreeSHAP, "
               "in log-odds)")


def _out(r: ScoreResult, explain: bool, e: RowExplanation | None = None) -> ScoreOut:
    features = explanation = None
    if explain:
        features = {
            name: FeatureValue(value=_jsonable(v), age_seconds=r.vector.ages.get(name))
            for name, v in r.vector.values.items()
        }
    if e is not None:
        explanation = Explanation(base_value=e.base_value, contributions=e.contributions, reasons=[
            Reason(feature=x.feature, value=x.value, contribution=x.contribution,
                   direction=x.direction) for x in e.reasons()])
    # built from the scorer's own typed result: no validation pass (the response is not
    # validated again either, see the routes)
    return ScoreOut.model_construct(
        transaction_id=r.transaction_id, score=r.score, decision=r.decision,
        model_version=r.model_version, feature_service=r.feature_service,
        missing_features=r.vector.missing, features=features, explanation=explanation)


def _jsonable(v: object) -> object:
    return None if isinstance(v, float) and v != v else v  # NaN -> null


@router.post("/score", response_model=ScoreOut)
async def score(
    txn: TransactionIn, models: ModelsDep, service: ServiceDep,
    explain: Annotated[bool, Query(description=EXPLAIN_DOC)] = False,
) -> ScoreOut:
    """Score one transaction as of its `event_timestamp` (default now)."""
    results, explained = await service.score(models, [txn], explain)
    out = _out(results[0], explain, explained[0])
    # already validated: skip FastAPI's second validation pass of the return value
    return Response(out.model_dump_json(), media_type="application/json")  # type: ignore[return-value]


@router.post("/score/batch", response_model=BatchOut)
async def score_batch(
    body: BatchIn, models: ModelsDep, service: ServiceDep,
    explain: Annotated[bool, Query(description=EXPLAIN_DOC)] = False,
) -> BatchOut:
    """Score up to SERVING_MAX_BATCH (at most 1,000) transactions with one online lookup."""
    limit = service.settings.max_batch
    if len(body.transactions) > limit:
        raise HTTPException(422, [{"field": "transactions", "type": "too_long",
                                   "message": f"at most {limit} transactions "
                                   "per request (SERVING_MAX_BATCH)"}])
    results, explained = await service.score(models, body.transactions, explain)
    out = BatchOut(results=[_out(r, explain, e) for r, e in zip(results, explained, strict=True)])
    return Response(out.model_dump_json(), media_type="application/json")  # type: ignore[return-value]
