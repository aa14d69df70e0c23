"""The HTTP contract of the scorer (`serving.app.create_app`), end to end.

Every test goes through `TestClient(create_app(...))` used as a context manager, so the real
lifespan runs: the trained artifact is verified and loaded, the real feature registry is read
and features come from the session's Redis database (materialized up to SIM_END).

Request time: T = SIM_END + 1 h.  Profile snapshots are written at 00:00 UTC each day and the
one at SIM_END is in Redis, so for T a known user's and merchant's profiles are exactly 3,600 s
old; the user's velocity row (their last transaction before SIM_END) is valid for 30 days.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from feature_repo import history
from feature_repo.definitions import PROFILE_TTL, VELOCITY_TTL
from feature_repo.paths import velocity_history_dir
from scoring import scorer as scorer_module
from scoring.artifact import ArtifactError
from scoring.registry import Registry
from serving.app import create_app
from serving.config import ServingSettings
from serving.logs import JsonFormatter
from tests.conftest import SIM_END
from training.retrieval import read_transactions

pytestmark = pytest.mark.integration

END = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
T = END + timedelta(hours=1)
RESPONSE_FIELDS = {"transaction_id", "score", "decision", "model_version", "feature_service",
                   "missing_features", "features", "explanation"}
USER_PROFILE = {"user_txn_count_30d", "user_amount_mean_30d", "user_amount_std_30d",
                "user_distinct_merchants_30d", "user_account_age_days", "user_utc_offset_hours",
                "user_usual_hour_30d"}
MERCHANT_PROFILE = {"merchant_txn_count_30d", "merchant_amount_mean_30d",
                    "merchant_fraud_rate_30d"}
# request features that need the user's profile, and the one velocity feature that needs a row
NEEDS_USER_PROFILE = {"txn_amount_to_mean_30d", "txn_amount_zscore_30d", "txn_hour_local",
                      "txn_hours_from_usual_30d"}
NEEDS_VELOCITY_ROW = {"user_seconds_since_last_txn"}
METRIC_SAMPLES = {
    "fraud_requests_total", "fraud_request_latency_seconds_bucket",
    "fraud_online_lookup_seconds_bucket", "fraud_model_latency_seconds_bucket",
    "fraud_score_bucket", "fraud_decisions_total", "fraud_missing_features_total",
    "fraud_model_info",
}


# --- fixtures and helpers -------------------------------------------------------------------


def settings_for(artifact: Path, **overrides: Any) -> ServingSettings:
    return ServingSettings(model_dir=artifact.parent, model_version=artifact.name, **overrides)


@pytest.fixture(scope="module")
def client(trained_artifact: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(trained_artifact, access_log=True))) as c:
        yield c


@pytest.fixture(scope="module")
def metadata(trained_artifact: Path) -> dict[str, Any]:
    return json.loads((trained_artifact / "metadata.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def log_tx(feature_data: Path) -> pd.DataFrame:
    """The simulated log, minus users a live stream in this session may have written online."""
    tx = read_transactions(feature_data)
    rows = history.read(velocity_history_dir(feature_data), ["user_id", history.ORIGIN]).to_pandas()
    streamed = set(rows.loc[rows[history.ORIGIN] != history.BACKFILL, "user_id"])
    return tx[~tx["user_id"].isin(streamed)].reset_index(drop=True)


@pytest.fixture(scope="module")
def known(log_tx: pd.DataFrame) -> dict[str, Any]:
    """The last transaction of the log: its user and merchant have profiles at SIM_END."""
    last = log_tx.iloc[-1]
    assert last["event_timestamp"] > pd.Timestamp(END - timedelta(hours=1))
    return {"user_id": last["user_id"], "merchant_id": last["merchant_id"],
            "last_ts": last["event_timestamp"].to_pydatetime()}


def txn(user: str, merchant: str, *, tid: str = "api-1", at: datetime | None = T,
        amount: float = 42.5, channel: str = "online", currency: str = "EUR") -> dict[str, Any]:
    body: dict[str, Any] = {"transaction_id": tid, "user_id": user, "merchant_id": merchant,
                            "amount": amount, "currency": currency, "channel": channel}
    if at is not None:
        body["event_timestamp"] = at.isoformat()
    return body


def expected_decision(score: float, metadata: dict[str, Any]) -> str:
    review = metadata["thresholds"]["review"]
    decline = max(metadata["thresholds"]["decline"], review)
    return "decline" if score >= decline else "review" if score >= review else "approve"


def assert_clean_error(resp: Any, status: int | None = None) -> Any:
    """A 4xx (or `status`) JSON error with a `detail`, and nothing of a traceback."""
    if status is None:
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    else:
        assert resp.status_code == status, (resp.status_code, resp.text)
    assert "Traceback" not in resp.text and 'File "' not in resp.text, resp.text
    body = resp.json()
    assert set(body) == {"detail"}, body
    return body["detail"]


def error_fields(resp: Any) -> dict[str, str]:
    """field -> type of a 422 body."""
    detail = assert_clean_error(resp, 422)
    assert isinstance(detail, list) and detail, detail
    for e in detail:
        assert set(e) == {"field", "message", "type"} and e["message"], e
    return {e["field"]: e["type"] for e in detail}


def raw_post(client: TestClient, url: str, body: dict[str, Any]) -> Any:
    """POST `json.dumps(body)` as is: NaN / Infinity become the bare tokens Python emits."""
    return client.post(url, content=json.dumps(body),
                       headers={"content-type": "application/json"})


def metric_samples(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(resp.text) for s in fam.samples
    }


def predict(artifact: Path, metadata: dict[str, Any], features: dict[str, Any]) -> float:
    model = joblib.load(artifact / "model.joblib")
    x = np.array([[np.nan if features[f]["value"] is None else features[f]["value"]
                   for f in metadata["features"]]], dtype="float64")
    return float(model.predict_proba(x)[0, 1])


# --- POST /v1/score ---------------------------------------------------------------------------


def test_score_known_transaction(client: TestClient, known: dict[str, Any],
                                 metadata: dict[str, Any]) -> None:
    resp = client.post("/v1/score", json=txn(known["user_id"], known["merchant_id"]))
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert set(out) == RESPONSE_FIELDS
    assert out["transaction_id"] == "api-1"
    assert 0.0 <= out["score"] <= 1.0
    assert out["model_version"] == metadata["version"]
    assert out["feature_service"] == metadata["feature_service"] == "fraud_model_v1"
    assert out["missing_features"] == []
    assert out["features"] is None and out["explanation"] is None  # only with ?explain=true
    assert out["decision"] == expected_decision(out["score"], metadata)


def test_decisions_follow_the_model_thresholds(client: TestClient, log_tx: pd.DataFrame,
                                               metadata: dict[str, Any]) -> None:
    # each user one second after their last transaction, as logged and as a large payment:
    # recent bursts and missing profiles push some of these over the thresholds
    last = log_tx.groupby("user_id").tail(1)
    batch = []
    for r in last.itertuples():
        at = r.event_timestamp.to_pydatetime() + timedelta(seconds=1)
        batch.append(txn(r.user_id, r.merchant_id, tid=f"d{len(batch)}", at=at,
                         amount=float(r.amount), channel=r.channel))
        batch.append(txn(r.user_id, r.merchant_id, tid=f"d{len(batch)}", at=at, amount=400.0,
                         channel="contactless"))
        # and an ordinary purchase an hour after the last snapshot: profiles fresh, no burst
        batch.append(txn(r.user_id, r.merchant_id, tid=f"d{len(batch)}",
                         at=END + timedelta(hours=13), amount=float(r.amount),
                         channel=r.channel))
    resp = client.post("/v1/score/batch", json={"transactions": batch[:1000]})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["transaction_id"] for r in results] == [b["transaction_id"] for b in batch[:1000]]
    for r in results:
        assert r["decision"] == expected_decision(r["score"], metadata), r
    assert len({r["decision"] for r in results}) >= 2, "every score fell on one side"


def test_explain_returns_every_model_input(client: TestClient, known: dict[str, Any],
                                          metadata: dict[str, Any],
                                          trained_artifact: Path) -> None:
    body = txn(known["user_id"], known["merchant_id"], amount=42.5, channel="online")
    resp = client.post("/v1/score?explain=true", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    feats = out["features"]
    assert list(feats) == metadata["features"]  # by name, in the model's input order
    for name, fv in feats.items():
        assert set(fv) == {"value", "age_seconds"}, (name, fv)
        assert fv["value"] is not None, name  # nothing is missing for this transaction
        if name in USER_PROFILE | MERCHANT_PROFILE:  # stored: the SIM_END snapshot, 1 h old
            assert fv["age_seconds"] == pytest.approx(3600.0), name
        else:  # computed at request time
            assert fv["age_seconds"] is None, name
    # 01:00 UTC in the card holder's zone, and round the clock from their usual hour
    offset = feats["user_utc_offset_hours"]["value"]
    assert feats["txn_hour_local"]["value"] == pytest.approx((1 + offset) % 24)
    gap = abs(1 - feats["user_usual_hour_30d"]["value"])
    assert feats["txn_hours_from_usual_30d"]["value"] == pytest.approx(min(gap, 24 - gap))
    assert feats["txn_is_online"]["value"] == 1 and feats["txn_is_atm"]["value"] == 0
    assert feats["txn_amount_log"]["value"] == pytest.approx(math.log1p(42.5))
    mean = feats["user_amount_mean_30d"]["value"]
    assert feats["txn_amount_to_mean_30d"]["value"] == pytest.approx(42.5 / mean)
    assert feats["user_txn_count_30d"]["value"] >= 1
    since_last = (T - known["last_ts"]).total_seconds()
    assert feats["user_seconds_since_last_txn"]["value"] == pytest.approx(since_last, abs=1e-3)
    assert feats["user_is_new_merchant"]["value"] == 0  # the user's own last merchant
    # the explanation is the model's input: the model gives the same score from it
    assert predict(trained_artifact, metadata, feats) == pytest.approx(out["score"], abs=1e-12)
    # explain changes nothing about the answer
    plain = client.post("/v1/score", json=body).json()
    assert {k: v for k, v in out.items() if k not in ("features", "explanation")} == {
        k: v for k, v in plain.items() if k not in ("features", "explanation")}
    assert plain["explanation"] is None and out["explanation"]["method"] == "tree_shap"


def test_unknown_user_and_merchant_are_scored(client: TestClient, known: dict[str, Any],
                                             metadata: dict[str, Any]) -> None:
    before = metric_samples(client)
    resp = client.post("/v1/score?explain=true", json=txn("u-never-seen", "m-never-seen"))
    assert resp.status_code == 200, resp.text
    out = resp.json()
    missing = USER_PROFILE | MERCHANT_PROFILE | NEEDS_USER_PROFILE | NEEDS_VELOCITY_ROW
    assert set(out["missing_features"]) == missing
    assert out["decision"] == expected_decision(out["score"], metadata)
    feats = out["features"]
    for name in missing:
        assert feats[name] == {"value": None, "age_seconds": None}, name
    assert feats["user_txn_count_10m"]["value"] == 0  # no history: counts are zero
    assert feats["user_txn_count_1h"]["value"] == 0
    assert feats["user_is_new_merchant"]["value"] == 1
    after = metric_samples(client)
    key = ("fraud_missing_features_total",
           frozenset({("feature", "user_txn_count_30d"), ("reason", "missing")}))
    assert after[key] - before.get(key, 0.0) == 1.0

    # a known user at an unknown merchant: only the merchant's profile is missing
    resp = client.post("/v1/score", json=txn(known["user_id"], "m-never-seen"))
    assert resp.status_code == 200, resp.text
    assert set(resp.json()["missing_features"]) == MERCHANT_PROFILE


def test_event_timestamp_defaults_to_now(client: TestClient, known: dict[str, Any]) -> None:
    t0 = datetime.now(UTC)
    resp = client.post("/v1/score?explain=true",
                       json=txn(known["user_id"], known["merchant_id"], at=None))
    t1 = datetime.now(UTC)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    feats = out["features"]
    # the SIM_END snapshot is usable only while now - PROFILE_TTL <= SIM_END <= now
    if END <= t0 and t1 - PROFILE_TTL <= END:
        age = feats["user_txn_count_30d"]["age_seconds"]
        assert (t0 - END).total_seconds() - 1 <= age <= (t1 - END).total_seconds() + 1
        # the hour is now's (t0 <= now <= t1), in the card holder's zone
        offset = feats["user_utc_offset_hours"]["value"]
        utc_hour = (feats["txn_hour_local"]["value"] - offset) % 24
        lo = t0.hour + t0.minute / 60 + t0.second / 3600 + t0.microsecond / 3.6e9
        assert (utc_hour - lo) % 24 <= (t1 - t0).total_seconds() / 3600 + 1e-6
    else:  # no profile: no time zone, no local hour
        assert USER_PROFILE | MERCHANT_PROFILE | NEEDS_USER_PROFILE <= set(out["missing_features"])
    # the velocity row (last transaction before SIM_END) is windowed at now
    last = known["last_ts"]
    if t1 - VELOCITY_TTL <= last:
        since = feats["user_seconds_since_last_txn"]["value"]
        assert (t0 - last).total_seconds() - 1 <= since <= (t1 - last).total_seconds() + 1
    else:
        assert "user_seconds_since_last_txn" in out["missing_features"]


def test_a_slightly_future_timestamp_is_accepted(client: TestClient,
                                                 known: dict[str, Any]) -> None:
    at = datetime.now(UTC) + timedelta(minutes=4)  # clock skew within the 5-minute allowance
    resp = client.post("/v1/score", json=txn(known["user_id"], known["merchant_id"], at=at))
    assert resp.status_code == 200, resp.text


# --- POST /v1/score/batch -------------------------------------------------------------------


def test_batch_equals_single_calls(client: TestClient, known: dict[str, Any]) -> None:
    u, m = known["user_id"], known["merchant_id"]
    batch = [
        txn(u, m, tid="b0"),
        txn(u, m, tid="b1", at=T + timedelta(minutes=7), amount=950.0, channel="atm"),
        txn(u, m, tid="b2", at=END + timedelta(days=3)),  # profiles past their TTL
        txn("u-never-seen", m, tid="b3", channel="contactless"),
        txn(u, "m-never-seen", tid="b4", amount=3.2, channel="card_present"),
        txn(u, m, tid="b5", at=END),  # the snapshot's own instant: row_ts <= t holds
    ]
    resp = client.post("/v1/score/batch?explain=true", json={"transactions": batch})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["transaction_id"] for r in results] == [b["transaction_id"] for b in batch]
    for body, got in zip(batch, results, strict=True):
        single = client.post("/v1/score?explain=true", json=body)
        assert single.status_code == 200, single.text
        want = single.json()
        assert got["score"] == pytest.approx(want["score"], abs=1e-12)
        assert {k: v for k, v in got.items() if k != "score"} == {
            k: v for k, v in want.items() if k != "score"}
    # the batch is not trivially uniform
    assert len({tuple(r["missing_features"]) for r in results}) >= 3
    assert set(results[2]["missing_features"]) >= USER_PROFILE | MERCHANT_PROFILE
    assert results[5]["missing_features"] == []


def test_a_batch_scores_alike_inline_and_in_worker_threads(
        client: TestClient, known: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `OFFLOAD_ROWS` a batch is assembled and scored in worker threads: same answer."""
    u, m = known["user_id"], known["merchant_id"]
    kinds = [txn(u, m), txn(u, m, at=END + timedelta(days=3)), txn("u-never-seen", m),
             txn(u, "m-never-seen", amount=3.2, channel="atm")]
    batch = [{**kinds[i % 4], "transaction_id": f"o{i}"} for i in range(300)]
    assert len(batch) >= scorer_module.OFFLOAD_ROWS
    started = scorer_module.OFFLOAD.last_end
    threaded = client.post("/v1/score/batch", json={"transactions": batch})
    assert scorer_module.OFFLOAD.last_end > started  # it went through the worker threads
    monkeypatch.setattr(scorer_module, "OFFLOAD_ROWS", len(batch) + 1)
    started = scorer_module.OFFLOAD.last_end
    inline = client.post("/v1/score/batch", json={"transactions": batch})
    assert scorer_module.OFFLOAD.last_end == started  # ... and this one did not
    assert threaded.status_code == inline.status_code == 200
    assert threaded.content == inline.content


def test_batch_size_limits(client: TestClient, known: dict[str, Any]) -> None:
    one = txn(known["user_id"], known["merchant_id"])
    full = [{**one, "transaction_id": f"n{i}"} for i in range(1000)]
    resp = client.post("/v1/score/batch", json={"transactions": full})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"]) == 1000
    over = client.post("/v1/score/batch",
                       json={"transactions": [*full, {**one, "transaction_id": "n1000"}]})
    assert error_fields(over) == {"transactions": "too_long"}
    empty = client.post("/v1/score/batch", json={"transactions": []})
    assert error_fields(empty) == {"transactions": "too_short"}



def test_batch_errors_name_the_item(client: TestClient, known: dict[str, Any]) -> None:
    good = txn(known["user_id"], known["merchant_id"])
    bad = {**good, "transaction_id": "x", "amount": float("nan")}
    assert error_fields(raw_post(client, "/v1/score/batch", {"transactions": [good, bad]})) == {
        "transactions.1.amount": "finite_number"}
    future = {**good, "event_timestamp": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}
    resp = client.post("/v1/score/batch", json={"transactions": [good, future]})
    assert error_fields(resp) == {"transactions.1.event_timestamp": "future"}


# --- health, readiness, metrics -------------------------------------------------------------


def test_health(client: TestClient) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_ready(client: TestClient) -> None:
    resp = client.get("/ready")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"ready": True,
                           "checks": {"model": True, "redis": True, "registry": True}}


def test_metrics(client: TestClient, known: dict[str, Any], metadata: dict[str, Any]) -> None:
    before = metric_samples(client)
    resp = client.post("/v1/score", json=txn(known["user_id"], known["merchant_id"]))
    assert resp.status_code == 200
    unknown = client.post("/v1/score", json=txn("u-never-seen", known["merchant_id"]))
    assert unknown.status_code == 200
    assert client.post("/v1/score", json={}).status_code == 422
    after = metric_samples(client)

    assert METRIC_SAMPLES <= {name for name, _ in after}

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("fraud_requests_total", route="/v1/score", method="POST", status="200") == 2
    assert delta("fraud_requests_total", route="/v1/score", method="POST", status="422") == 1
    assert delta("fraud_request_latency_seconds_count", route="/v1/score") == 3
    assert delta("fraud_online_lookup_seconds_count") == 2
    assert delta("fraud_model_latency_seconds_count") == 2
    assert delta("fraud_score_count") == 2
    assert delta("fraud_score_sum") == pytest.approx(
        resp.json()["score"] + unknown.json()["score"])
    decisions = [resp.json()["decision"], unknown.json()["decision"]]
    for d in {"approve", "review", "decline"}:
        assert delta("fraud_decisions_total", decision=d) == decisions.count(d)
    assert delta("fraud_missing_features_total", feature="user_txn_count_30d",
                 reason="missing") == 1
    assert delta("fraud_missing_features_total", feature="merchant_txn_count_30d",
                 reason="missing") == 0
    info = ("fraud_model_info", frozenset({("version", metadata["version"]),
                                           ("feature_service", metadata["feature_service"])}))
    assert after[info] == 1.0
    # route labels are templates or "unmatched", never raw paths
    client.get("/no/such/path/4711")
    routes = {dict(labels).get("route") for name, labels in metric_samples(client)
              if name == "fraud_requests_total"}
    assert "/no/such/path/4711" not in routes and "unmatched" in routes


def test_openapi_documents_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/score", "/v1/score/batch", "/health", "/ready", "/metrics"} <= set(paths)
    # every status the app answers is documented (the 503s are not reached by the fuzzing,
    # which runs with Redis up)
    for path in ("/v1/score", "/v1/score/batch"):
        assert {"200", "400", "413", "422", "503"} <= set(paths[path]["post"]["responses"])
    ready = paths["/ready"]["get"]["responses"]
    assert {"200", "503"} <= set(ready) and "Retry-After" in ready["503"]["headers"]


# --- invalid input: 4xx naming the field, never a traceback -----------------------------------

FUTURE = object()  # placeholder: now + 10 minutes, computed per test

INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, fields to change, field named in the error, error type)
    ("nan_amount", {"amount": float("nan")}, "amount", "finite_number"),
    ("infinite_amount", {"amount": float("inf")}, "amount", "finite_number"),
    ("minus_infinite_amount", {"amount": float("-inf")}, "amount", "finite_number"),
    ("negative_amount", {"amount": -5.0}, "amount", "greater_than"),
    ("zero_amount", {"amount": 0}, "amount", "greater_than"),
    ("absurd_amount", {"amount": 1e9}, "amount", "less_than_equal"),
    ("unknown_channel", {"channel": "carrier_pigeon"}, "channel", "literal_error"),
    ("unknown_currency", {"currency": "JPY"}, "currency", "literal_error"),
    ("naive_timestamp", {"event_timestamp": "2026-09-01T01:00:00"}, "event_timestamp",
     "value_error"),
    ("garbage_timestamp", {"event_timestamp": "yesterday"}, "event_timestamp",
     "datetime_from_date_parsing"),
    ("future_timestamp", {"event_timestamp": FUTURE}, "event_timestamp", "future"),
    ("missing_user", {"user_id": None}, "user_id", "missing"),
    ("extra_field", {"is_fraud": 1}, "is_fraud", "extra_forbidden"),
    ("user_id_number", {"user_id": 123}, "user_id", "string_type"),
    ("user_id_with_spaces", {"user_id": "u 1; DROP"}, "user_id", "string_pattern_mismatch"),
    ("user_id_too_long", {"user_id": "u" * 65}, "user_id", "string_too_long"),
    ("amount_text", {"amount": "12.50"}, "amount", "float_type"),
    ("amount_bool", {"amount": True}, "amount", "float_type"),
    ("amount_list", {"amount": [1.0]}, "amount", "float_type"),
    ("channel_number", {"channel": 2}, "channel", "literal_error"),
    ("timestamp_epoch_number", {"event_timestamp": 1793494800}, "event_timestamp",
     "value_error"),
    ("timestamp_epoch_text", {"event_timestamp": "1793494800"}, "event_timestamp",
     "value_error"),
    ("timestamp_epoch_millis_text", {"event_timestamp": "1793494800000"}, "event_timestamp",
     "value_error"),
    ("schema_version_field", {"schema_version": 1}, "schema_version", "extra_forbidden"),
]


@pytest.mark.parametrize(("change", "field", "etype"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_transaction_is_a_422_naming_the_field(
    client: TestClient, known: dict[str, Any], change: dict[str, Any], field: str, etype: str
) -> None:
    body = txn(known["user_id"], known["merchant_id"])
    for k, v in change.items():
        if v is None:
            del body[k]
        elif v is FUTURE:
            body[k] = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
        else:
            body[k] = v
    fields = error_fields(raw_post(client, "/v1/score", body))
    assert fields == {field: etype}


def test_nan_is_refused_as_sent_on_the_wire(client: TestClient, known: dict[str, Any]) -> None:
    text = json.dumps(txn(known["user_id"], known["merchant_id"])).replace("42.5", "NaN")
    assert '"amount": NaN' in text
    resp = client.post("/v1/score", content=text, headers={"content-type": "application/json"})
    assert error_fields(resp) == {"amount": "finite_number"}


def test_body_that_is_not_an_object(client: TestClient) -> None:
    assert error_fields(client.post("/v1/score", json=[1, 2])) == {
        "body": "model_attributes_type"}
    assert error_fields(client.post("/v1/score", json={})).keys() == {
        "transaction_id", "user_id", "merchant_id", "amount", "currency", "channel"}


def test_oversized_body_is_a_413(client: TestClient) -> None:
    body = b'{"transaction_id": "' + b"x" * 1_000_001 + b'"}'
    resp = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    detail = assert_clean_error(resp, 413)
    assert "1000000 bytes" in detail


def test_oversized_chunked_body_is_a_413(client: TestClient) -> None:
    """A body without Content-Length (chunked) is capped too, not read whole into memory."""
    def chunks() -> Iterator[bytes]:
        yield b'{"transaction_id": "'
        for _ in range(20):
            yield b"x" * 100_000
        yield b'"}'

    resp = client.post("/v1/score", content=chunks(),
                       headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert_clean_error(resp, 413)


@pytest.mark.parametrize(("content", "headers"), [
    pytest.param(None, {"content-type": "text/plain"}, id="text_plain"),
    pytest.param(None, {}, id="no_content_type"),
    pytest.param(b'{"transaction_id": "\xff\xfe"}', {"content-type": "application/json"},
                 id="invalid_utf8"),
    pytest.param(b'{"transaction_id": ', {"content-type": "application/json"},
                 id="truncated_json"),
    pytest.param(b"", {"content-type": "application/json"}, id="empty_body"),
])
def test_undecodable_bodies_are_4xx(client: TestClient, known: dict[str, Any],
                                    content: bytes | None, headers: dict[str, str]) -> None:
    if content is None:
        content = json.dumps(txn(known["user_id"], known["merchant_id"])).encode()
    resp = client.post("/v1/score", content=content, headers=headers)
    assert_clean_error(resp)


def test_wrong_method_and_unknown_route(client: TestClient) -> None:
    assert_clean_error(client.get("/v1/score"), 405)
    assert_clean_error(client.get("/v2/score"), 404)


# (its own app: closing it removes the process-wide model info series the module's client set)
def test_max_batch_setting(trained_artifact: Path, known: dict[str, Any]) -> None:
    one = txn(known["user_id"], known["merchant_id"])
    batch = [{**one, "transaction_id": f"n{i}"} for i in range(5)]
    with TestClient(create_app(settings_for(trained_artifact, max_batch=4))) as small:
        assert error_fields(small.post("/v1/score/batch", json={"transactions": batch})) == {
            "transactions": "too_long"}
        ok = small.post("/v1/score/batch", json={"transactions": batch[:4]})
        assert ok.status_code == 200, ok.text


# --- request ids and structured logs ---------------------------------------------------------


def test_request_id_is_echoed_and_logged(client: TestClient, known: dict[str, Any]) -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("serving")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ok = client.post("/v1/score", json=txn(known["user_id"], known["merchant_id"]),
                         headers={"X-Request-ID": "req-ok-4711"})
        bad = client.post("/v1/score", json={"amount": -1}, headers={"X-Request-ID": "req-bad-1"})
        anon = client.get("/health")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "req-ok-4711"
    assert bad.status_code == 422 and bad.headers["x-request-id"] == "req-bad-1"
    generated = anon.headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0  # a fresh uuid4 hex
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]  # one object per line
    by_id = {rec["request_id"]: rec for rec in lines if rec["msg"] == "request"}
    assert by_id["req-ok-4711"]["path"] == "/v1/score"
    assert by_id["req-ok-4711"]["status"] == 200
    assert by_id["req-bad-1"]["status"] == 422
    assert by_id[generated]["path"] == "/health"
    for rec in lines:
        assert {"ts", "level", "logger", "msg", "request_id"} <= set(rec)
        assert datetime.fromisoformat(rec["ts"]).tzinfo is not None
    assert all(rec["ms"] >= 0 for rec in by_id.values())


# --- Redis unavailable --------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on exit: nothing listens there


@pytest.fixture(scope="module")
def down_client(trained_artifact: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[TestClient]:
    """A second app whose online store points at a port nothing listens on.

    A copy of the artifact under another version keeps its `fraud_model_info` series apart
    from the main app's.  REDIS_URL is read when the store's config is built in the lifespan;
    the registry is SQL (SQLite), so start-up itself needs no Redis.
    """
    models = tmp_path_factory.mktemp("down-models")
    artifact = shutil.copytree(trained_artifact, models / "down-test")
    meta = json.loads((artifact / "metadata.json").read_text())
    (artifact / "metadata.json").write_text(json.dumps({**meta, "version": "down-test"}))
    Registry(models).register(Path(artifact))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDIS_URL", f"redis://127.0.0.1:{closed_port()}/15")
        with TestClient(create_app(settings_for(artifact))) as c:
            yield c


def test_redis_down_is_a_503_with_retry_after(down_client: TestClient,
                                              known: dict[str, Any]) -> None:
    body = txn(known["user_id"], known["merchant_id"])
    for url, payload in (("/v1/score", body), ("/v1/score/batch", {"transactions": [body]})):
        resp = down_client.post(url, json=payload)
        detail = assert_clean_error(resp, 503)
        assert "online feature store unavailable" in detail
        assert resp.headers["retry-after"] == "2"
    ready = down_client.get("/ready")
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "2"
    assert ready.json() == {"ready": False,
                            "checks": {"model": True, "redis": False, "registry": True}}
    assert down_client.get("/health").status_code == 200  # alive, just not ready
    # input is still validated first
    assert error_fields(down_client.post("/v1/score", json={**body, "amount": -1})) == {
        "amount": "greater_than"}


def test_redis_down_answers_quickly(down_client: TestClient, known: dict[str, Any]) -> None:
    """A refused connection is a 503 at once, not after redis-py's default retries (3, with
    exponential backoff and jitter from 1 s) on top of the 0.5 s socket timeouts."""
    body = txn(known["user_id"], known["merchant_id"])
    for _ in range(2):
        t0 = time.perf_counter()
        assert down_client.post("/v1/score", json=body).status_code == 503
        assert time.perf_counter() - t0 < 2.0
    t0 = time.perf_counter()
    assert down_client.get("/ready").status_code == 503
    assert time.perf_counter() - t0 < 2.0


# --- artifact checks at start-up ------------------------------------------------------------


def copy_artifact(trained_artifact: Path, tmp_path: Path) -> Path:
    """A copy under another version, so its metrics series stay apart from the main app's."""
    artifact = Path(shutil.copytree(trained_artifact, tmp_path / "models" / "copy"))
    edit_metadata(artifact, version="copy")  # the hash covers model.joblib only
    return artifact


def edit_metadata(artifact: Path, **changes: Any) -> None:
    meta = json.loads((artifact / "metadata.json").read_text())
    (artifact / "metadata.json").write_text(json.dumps({**meta, **changes}))


def start(artifact: Path) -> None:
    """Start a scorer pinned to `artifact`, unregistered (the development flag allows it)."""
    with TestClient(create_app(settings_for(artifact, allow_unregistered_models=True))):
        pass


def test_the_unmodified_copy_starts(trained_artifact: Path, tmp_path: Path) -> None:
    start(copy_artifact(trained_artifact, tmp_path))  # the refusals below are not spurious


def test_modified_model_file_is_refused_before_unpickling(trained_artifact: Path,
                                                          tmp_path: Path) -> None:
    artifact = copy_artifact(trained_artifact, tmp_path)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (open, (str(marker), "w"))  # runs if anything unpickles the file

    (artifact / "model.joblib").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ArtifactError, match="refusing to load a modified artifact") as err:
        start(artifact)
    assert str(artifact / "model.joblib") in str(err.value)
    assert not marker.exists()


def test_metadata_hash_mismatch_is_refused(trained_artifact: Path, tmp_path: Path) -> None:
    artifact = copy_artifact(trained_artifact, tmp_path)
    edit_metadata(artifact, sha256="0" * 64)
    with pytest.raises(ArtifactError, match="has sha256 .* metadata says 000000000000"):
        start(artifact)


def test_unknown_feature_service_is_refused(trained_artifact: Path, tmp_path: Path) -> None:
    artifact = copy_artifact(trained_artifact, tmp_path)
    edit_metadata(artifact, feature_service="fraud_model_v999")
    with pytest.raises(ArtifactError, match="'fraud_model_v999' .* is not in the registry"):
        start(artifact)


def test_feature_order_mismatch_is_refused(trained_artifact: Path, tmp_path: Path,
                                           metadata: dict[str, Any]) -> None:
    artifact = copy_artifact(trained_artifact, tmp_path)
    edit_metadata(artifact, features=list(reversed(metadata["features"])))
    with pytest.raises(ArtifactError, match="expects features"):
        start(artifact)


def test_missing_files_are_refused(trained_artifact: Path, tmp_path: Path) -> None:
    no_model = copy_artifact(trained_artifact, tmp_path / "a")
    (no_model / "model.joblib").unlink()
    with pytest.raises(ArtifactError, match="model.joblib is missing"):
        start(no_model)
    no_meta = copy_artifact(trained_artifact, tmp_path / "b")
    (no_meta / "metadata.json").unlink()
    with pytest.raises(ArtifactError, match="no model metadata"):
        start(no_meta)
    bad_json = copy_artifact(trained_artifact, tmp_path / "c")
    (bad_json / "metadata.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        start(bad_json)
