"""`feature_repo.contract.construct` builds the same instances as pydantic's `model_construct` for
the scorer's own calls (the response rows and the events of a request), and falls back to it
for any other call; a response without explanations is written as the models write it."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from feature_repo.contract import TransactionEvent, construct
from scoring.features import FeatureVector
from scoring.scorer import ScoreResult
from serving.routes.scoring import _out, _plain_json, plain_out
from serving.schemas import BatchOut, FeatureValue, ScoreOut, TransactionIn


def _same(a: BaseModel, b: BaseModel) -> None:
    assert type(a) is type(b)
    assert list(a.__dict__.items()) == list(b.__dict__.items())  # values and their order
    assert a.model_fields_set == b.model_fields_set
    assert a.__pydantic_extra__ == b.__pydantic_extra__
    assert a.__pydantic_private__ == b.__pydantic_private__
    assert a.model_dump_json() == b.model_dump_json()


def test_a_response_row_is_model_constructs() -> None:
    values: dict[str, Any] = {
        "transaction_id": "t1", "score": 5.716950582978359e-05, "decision": "approve",
        "model_version": "v1", "feature_service": "fraud_model_v1",
        "missing_features": ["user_amount_std_30d"],
        "features": {"x": FeatureValue(value=None, age_seconds=1.5)}, "explanation": None}
    _same(construct(ScoreOut, dict(values)), ScoreOut.model_construct(**values))


def test_an_event_is_model_constructs() -> None:
    txn = TransactionIn(transaction_id="t1", user_id="u1", merchant_id="m1", amount=12.5,
                        currency="EUR", channel="online",
                        event_timestamp=datetime(2026, 12, 5, 12, tzinfo=UTC))
    given = txn.model_dump()
    _same(txn.to_event(), TransactionEvent.model_construct(**given))
    assert "schema_version" not in txn.to_event().model_fields_set


def test_other_calls_go_through_model_construct() -> None:
    class Aliased(BaseModel):
        a: int = Field(alias="A")
        b: int = 2

    _same(construct(Aliased, {"a": 1, "b": 3}), Aliased.model_construct(a=1, b=3))
    _same(construct(Aliased, {"A": 1}), Aliased.model_construct(A=1))  # short of a field
    short = {"transaction_id": "t1", "score": 0.5}
    _same(construct(ScoreOut, dict(short)), ScoreOut.model_construct(**short))


def test_a_plain_response_is_the_models_json() -> None:
    """`plain_out` through `to_json` writes the bytes the validated models write."""
    scores = [0.0, 1.0, 5.716950582978359e-05, 0.1 + 0.2, 1e-300, 0.5, 0.9999999999999999]
    results = [ScoreResult(f"t-{i}-ü✓\"\\", s, "approve" if s < 0.5 else "decline", "v2",
                           "fraud_model_v1",
                           FeatureVector({"a": 1.0}, missing=["a", "b"][: i % 3]))
               for i, s in enumerate(scores)]
    expected = BatchOut(results=[ScoreOut(
        transaction_id=r.transaction_id, score=r.score, decision=r.decision,
        model_version=r.model_version, feature_service=r.feature_service,
        missing_features=r.vector.missing) for r in results])
    assert _plain_json({"results": [plain_out(r) for r in results]}) == \
        expected.model_dump_json().encode()
    assert _plain_json(plain_out(results[2])) == expected.results[2].model_dump_json().encode()
    # a score no validated model would hold (a model answering NaN): null, as the models write
    for odd in (math.nan, math.inf, -math.inf):
        r = results[0]._replace(score=odd)
        assert _plain_json(plain_out(r)) == _out(r, False).model_dump_json().encode()
