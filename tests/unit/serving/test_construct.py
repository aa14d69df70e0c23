"""`serving.schemas.construct` builds the same instances as pydantic's `model_construct` for
the scorer's own calls (the response rows and the events of a request), and falls back to it
for any other call."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from feature_repo.contract import TransactionEvent
from serving.schemas import FeatureValue, ScoreOut, TransactionIn, construct


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
