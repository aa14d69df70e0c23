"""`POST /v1/score` and `POST /v1/score/batch` (X-API-Key when SERVING_API_KEY is set: the
app adds the check when it includes this router)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, params
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic_core import to_json

from feature_repo.contract import construct
from scoring.explain import TOP_REASONS
from scoring.explain import Explanation as RowExplanation
from scoring.models import ModelSet
from scoring.scorer import ScoreResult
from serving.deps import (
    ModelsDep,
    ServiceDep,
    api_key_header,
    get_models,
    get_service,
    require_api_key,
)
from serving.lane import LaneRoute, Operation
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
from serving.service import ScoringService

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
    return construct(ScoreOut, {
        "transaction_id": r.transaction_id, "score": r.score, "decision": r.decision,
        "model_version": r.model_version, "feature_service": r.feature_service,
        "missing_features": r.vector.missing, "features": features, "explanation": explanation})


def _jsonable(v: object) -> object:
    return None if isinstance(v, float) and v != v else v  # NaN -> null


def plain_out(r: ScoreResult) -> dict[str, Any]:
    """`ScoreOut` of a result without `?explain=true`, as the dict of its fields in order:
    `_plain_json` writes it as `_out(r, False).model_dump_json()` does, at a fraction of the
    CPU (no model per row; tests/unit/serving/test_construct.py checks the bytes)."""
    return {"transaction_id": r.transaction_id, "score": r.score, "decision": r.decision,
            "model_version": r.model_version, "feature_service": r.feature_service,
            "missing_features": r.vector.missing, "features": None, "explanation": None}


def _plain_json(value: Any) -> bytes:
    # NaN and infinities as null, as the models write them (`ser_json_inf_nan`'s default)
    return to_json(value, inf_nan_mode="null")


def _json(body: Any) -> Response:
    # already validated: no second validation pass of the return value
    return Response(body, media_type="application/json")


async def score_one(service: ScoringService, models: ModelSet, txn: TransactionIn,
                    explain: bool = False) -> Response:
    """`POST /v1/score`'s work, for the endpoint and for the thin path (`serving.lane`)."""
    results, explained = await service.score(models, [txn], explain)
    if not explain:
        return _json(_plain_json(plain_out(results[0])))
    return _json(_out(results[0], explain, explained[0]).model_dump_json())


async def score_many(service: ScoringService, models: ModelSet, body: BatchIn,
                     explain: bool = False) -> Response:
    """`POST /v1/score/batch`'s work, for the endpoint and for the thin path."""
    limit = service.settings.max_batch
    if len(body.transactions) > limit:
        raise HTTPException(422, [{"field": "transactions", "type": "too_long",
                                   "message": f"at most {limit} transactions "
                                   "per request (SERVING_MAX_BATCH)"}])
    results, explained = await service.score(models, body.transactions, explain)
    if not explain:
        return _json(_plain_json({"results": [plain_out(r) for r in results]}))
    return _json(BatchOut.model_construct(
        results=[_out(r, explain, e) for r, e in zip(results, explained, strict=True)]
    ).model_dump_json())


@router.post("/score", response_model=ScoreOut)
async def score(
    txn: TransactionIn, models: ModelsDep, service: ServiceDep,
    explain: Annotated[bool, Query(description=EXPLAIN_DOC)] = False,
) -> ScoreOut:
    """Score one transaction as of its `event_timestamp` (default now)."""
    return await score_one(service, models, txn, explain)  # type: ignore[return-value]


@router.post("/score/batch", response_model=BatchOut)
async def score_batch(
    body: BatchIn, models: ModelsDep, service: ServiceDep,
    explain: Annotated[bool, Query(description=EXPLAIN_DOC)] = False,
) -> BatchOut:
    """Score up to SERVING_MAX_BATCH (at most 1,000) transactions with one online lookup."""
    return await score_many(service, models, body, explain)  # type: ignore[return-value]


async def _lane_score(request: Request, txn: TransactionIn) -> Response:
    return await score_one(await get_service(request), await get_models(request), txn)


async def _lane_batch(request: Request, body: BatchIn) -> Response:
    return await score_many(await get_service(request), await get_models(request), body)


def _keyed(operation: Operation) -> Operation:
    async def checked(request: Request, body: Any) -> Response:
        await require_api_key(request, await api_key_header(request))
        return await operation(request, body)

    return checked


# What the lane's operations call themselves (`_lane_score`, `_lane_batch`, `_keyed`): a
# dependency of a scoring route outside this set would be skipped by the lane.
LANE_CALLS = frozenset({get_models, get_service, require_api_key, api_key_header})


def check_lane(include_dependencies: Sequence[params.Depends] = ()) -> None:
    """Raise if a scoring route the lane answers depends on something the lane does not call
    (a dependency added to a route, to this router, or to `include_router(dependencies=...)`,
    passed here, would silently not run on the lane)."""
    lane = [r for r in router.routes if isinstance(r, APIRoute) and r.path in lane_routes(False)]
    calls = {d.dependency for d in [*router.dependencies, *include_dependencies]}
    todo = [dep for r in lane for dep in r.dependant.dependencies]
    while todo:
        dep = todo.pop()
        calls.add(dep.call)
        todo.extend(dep.dependencies)
    if unknown := calls - LANE_CALLS:
        raise RuntimeError(f"the scoring routes depend on {sorted(map(repr, unknown))}, which "
                           "serving.lane does not call: teach the lane "
                           "(serving/routes/scoring.py) or take the route off it")


def lane_routes(keyed: bool) -> dict[str, LaneRoute]:
    """This router's routes for the thin path (`serving.lane`), with the API-key check when
    the app includes the router `keyed`; ?explain takes FastAPI's path (a query string)."""
    ops: dict[Any, tuple[type[BaseModel], Operation]] = {
        score: (TransactionIn, _lane_score), score_batch: (BatchIn, _lane_batch)}
    return {r.path: LaneRoute(r, body, _keyed(op) if keyed else op)
            for r in router.routes if isinstance(r, APIRoute) and r.endpoint in ops
            for body, op in [ops[r.endpoint]]}
