"""The streaming scorer decides exactly as the HTTP scorer and routes alerts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bytewax.testing import TestingSink, TestingSource, run_main

from feature_repo.contract import TransactionEvent
from scoring.loader import load_scorer
from serving.config import ServingSettings
from streaming.score import BatchScorer, build_flow
from tests.conftest import SIM_END

pytestmark = pytest.mark.integration


def test_predictions_and_alerts_match_the_scorer(trained_artifact: Path,
                                                 materialized_store: Any) -> None:
    scorer = load_scorer(ServingSettings(model_dir=trained_artifact.parent,
                                         model_version=trained_artifact.name))
    at = datetime(SIM_END.year, SIM_END.month, SIM_END.day, 2, tzinfo=UTC)
    events = [
        TransactionEvent(transaction_id=f"ss-{i}", user_id=f"u{i:03d}", merchant_id="m-new",
                         amount=amount, currency="EUR", channel=channel,
                         event_timestamp=at + timedelta(seconds=i))
        for i, (amount, channel) in enumerate(
            [(12.0, "card_present"), (3000.0, "online"), (40.0, "contactless"),
             (2.0, "online"), (900.0, "atm")])
    ]
    raw = [e.model_dump_json().encode() for e in events] + [b"{not json"]
    out: list[Any] = []
    run_main(build_flow(TestingSource(raw, batch_size=10), TestingSink(out),
                        scorer=BatchScorer(scorer)))
    expected = {r.transaction_id: r for r in scorer.score(events)}
    preds = [json.loads(m.value) for m in out if m.topic == "predictions"]
    alerts = [json.loads(m.value) for m in out if m.topic == "fraud-alerts"]
    assert sorted(p["transaction_id"] for p in preds) == sorted(expected)  # bad event skipped
    for p in preds:
        r = expected[p["transaction_id"]]
        assert p["score"] == pytest.approx(r.score) and p["decision"] == r.decision
        assert p["model_version"] == trained_artifact.name
        assert set(p["features"]) == set(scorer.artifact.features)
        # the audit fields the HTTP scorer's prediction log carries, for the same replay
        event = next(e for e in events if e.transaction_id == p["transaction_id"])
        assert (p["amount"], p["currency"], p["channel"]) == (
            event.amount, event.currency, event.channel)
        assert p["stale_features"] == list(r.vector.stale)
        assert p["feature_ages"] == pytest.approx(r.vector.ages)
        assert p["feature_ages"]  # one age per stored feature read
    assert sorted(a["transaction_id"] for a in alerts) == sorted(
        t for t, r in expected.items() if r.decision != "approve")
    assert all(m.key == json.loads(m.value)["user_id"].encode() for m in out)
