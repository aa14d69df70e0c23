"""`ScoringService.check_time` names the first transaction past the future bound, whatever
its place in the batch, and lets every other batch through."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi import HTTPException

from scoring.prediction_log import PredictionLog
from serving.config import ServingSettings
from serving.schemas import TransactionIn
from serving.service import ScoringService


def _txn(i: int, ahead_s: float | None) -> TransactionIn:
    at = None if ahead_s is None else datetime.now(UTC) + timedelta(seconds=ahead_s)
    return TransactionIn(transaction_id=f"t{i}", user_id="u1", merchant_id="m1", amount=1.0,
                         currency="EUR", channel="online", event_timestamp=at)


@pytest.mark.parametrize(("ahead", "field"), [
    ([-60, None, 0, 10], None),
    ([None, None], None),
    ([-60, 3600, None, 7200], "transactions.1.event_timestamp"),  # the first, not the latest
    ([None, -5, 10, 3600], "transactions.3.event_timestamp"),
    ([3600], "event_timestamp"),
])
def test_the_first_future_transaction_is_named(ahead: list[float | None],
                                               field: str | None) -> None:
    settings = ServingSettings.model_validate({"FRAUD_MAX_FUTURE_SECONDS": 300})  # its alias
    assert settings.max_future_seconds == 300
    service = ScoringService(settings, PredictionLog())
    txns = [_txn(i, a) for i, a in enumerate(ahead)]
    if field is None:
        service.check_time(txns)
        return
    with pytest.raises(HTTPException) as refused:
        service.check_time(txns)
    assert refused.value.status_code == 422
    assert refused.value.detail[0]["field"] == field  # type: ignore[index]
    assert refused.value.detail[0]["type"] == "future"  # type: ignore[index]
