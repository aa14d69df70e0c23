"""Prediction log, skew audit, drift and batch scoring, end to end on the session's data.

Requests are scored through `TestClient(create_app(...))` at times T >= SIM_END: the daily
profiles taken at SIM_END 00:00 and every user's last velocity row before SIM_END are in Redis
(materialized) and valid for T (row_ts <= T, within the TTLs), so the online vector of a clean
request must equal the point-in-time vector `get_historical_features` gives for T.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from feature_repo import history
from feature_repo.contract import TransactionEvent, to_micros
from feature_repo.paths import features_dir, velocity_history_dir
from feature_repo.velocity import ROW_FIELDS
from scoring import drift
from scoring.features import FeatureVector
from scoring.prediction_log import KafkaSink, ParquetSink, PredictionLog, sampled
from scoring.scorer import ScoreResult
from serving.app import create_app
from serving.config import ServingSettings
from streaming.velocity_sink import VelocityRow, history_table
from tests.conftest import SIM_END
from training import batch_score, skew_audit
from training.retrieval import read_transactions

pytestmark = pytest.mark.integration

END = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
PROFILE = {"user_txn_count_30d", "user_amount_mean_30d", "user_amount_std_30d",
           "user_distinct_merchants_30d", "user_account_age_days", "user_utc_offset_hours",
           "user_usual_hour_30d", "merchant_txn_count_30d",
           "merchant_amount_mean_30d", "merchant_fraud_rate_30d"}
REQUEST = {"txn_amount_log", "txn_amount_to_mean_30d", "txn_amount_zscore_30d",
           "txn_hour_local", "txn_hours_from_usual_30d", "txn_is_online", "txn_is_atm"}
VELOCITY = {"user_txn_count_10m", "user_txn_count_1h", "user_amount_sum_1h",
            "user_distinct_merchants_24h", "user_seconds_since_last_txn", "user_is_new_merchant"}
CHANNELS = ["card_present", "online", "contactless", "atm"]


def _settings(artifact: Path, log_dir: Path) -> ServingSettings:
    return ServingSettings(model_dir=artifact.parent, model_version=artifact.name,
                           prediction_log_dir=log_dir, prediction_log_flush_records=20)


def _txn(tid: str, user: str, merchant: str, at: datetime, rng: np.random.Generator
         ) -> dict[str, Any]:
    return {"transaction_id": tid, "user_id": user, "merchant_id": merchant,
            "amount": float(np.round(rng.uniform(1, 400), 2)), "currency": "EUR",
            "channel": str(rng.choice(CHANNELS)), "event_timestamp": at.isoformat()}


@pytest.fixture(scope="module")
def population(feature_data: Path) -> dict[str, list[str]]:
    """Users whose velocity rows all come from the backfill (no live stream wrote online)."""
    vel = history.read(velocity_history_dir(feature_data), ["user_id", history.ORIGIN]).to_pandas()
    streamed = set(vel.loc[vel[history.ORIGIN] != history.BACKFILL, "user_id"])
    profiles = pd.read_parquet(features_dir(feature_data) / "merchant_profile.parquet")
    return {"users": sorted(set(vel["user_id"]) - streamed),
            "merchants": sorted(profiles["merchant_id"].unique())}


@pytest.fixture(scope="module")
def clean(trained_artifact: Path, population: dict[str, list[str]],
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """80 requests at SIM_END .. +20 h (plus edge cases) scored and logged by the app."""
    rng = np.random.default_rng(5)
    users = list(rng.choice(population["users"], 40, replace=False))
    txns = [_txn(f"audit-{i}", users[i % 40], str(rng.choice(population["merchants"])),
                 END + timedelta(seconds=int(rng.integers(0, 20 * 3600))), rng)
            for i in range(80)]
    txns.append(_txn("audit-at-end", users[0], population["merchants"][0], END, rng))
    txns.append(_txn("audit-unknown", "u-never-seen", "m-never-seen",
                     END + timedelta(hours=2), rng))
    txns.append(_txn("audit-past-ttl", users[1], population["merchants"][1],
                     END + timedelta(days=3), rng))  # profiles stale on both sides
    log_dir = tmp_path_factory.mktemp("prediction-log")
    with TestClient(create_app(_settings(trained_artifact, log_dir))) as client:
        out = [client.post("/v1/score/batch?explain=true", json={"transactions": txns[:50]})]
        out += [client.post("/v1/score?explain=true", json=t) for t in txns[50:]]
        assert all(r.status_code == 200 for r in out)
    results = out[0].json()["results"] + [r.json() for r in out[1:]]
    return {"txns": txns, "results": {r["transaction_id"]: r for r in results},
            "log_dir": log_dir, "users": users}


def _audit(log_dir: Path, tmp_path: Path, artifact: Path, *extra: str) -> tuple[int, Any]:
    report = tmp_path / "report.json"
    code = skew_audit.main(["--log-dir", str(log_dir), "--report", str(report),
                            "--model-dir", str(artifact.parent), *extra])
    return code, json.loads(report.read_text())


# --- the prediction log -------------------------------------------------------------------


def test_every_request_is_logged_with_its_full_vector(clean: dict[str, Any]) -> None:
    files = sorted(clean["log_dir"].rglob("*"))
    assert not [f for f in files if f.name.startswith(".")]  # no partial files left
    log = skew_audit.read_log(clean["log_dir"])
    assert sorted(log["transaction_id"]) == sorted(clean["results"])
    assert {p.parent.name for p in files if p.suffix == ".parquet"} == {
        f"date={END:%Y-%m-%d}", f"date={END + timedelta(days=3):%Y-%m-%d}"}
    for rec in log.itertuples():
        resp = clean["results"][rec.transaction_id]
        features = json.loads(rec.features)
        assert rec.score == resp["score"] and rec.decision == resp["decision"]
        assert features == {k: v["value"] for k, v in resp["features"].items()}
        assert rec.model_version == resp["model_version"]
        assert rec.feature_service == "fraud_model_v1"
    one = log.set_index("transaction_id").loc["audit-at-end"]
    sent = next(t for t in clean["txns"] if t["transaction_id"] == "audit-at-end")
    assert (one["user_id"], one["merchant_id"], one["amount"], one["channel"]) == (
        sent["user_id"], sent["merchant_id"], sent["amount"], sent["channel"])
    assert one["event_timestamp"] == pd.Timestamp(END)
    assert json.loads(one["feature_ages"])["user_amount_mean_30d"] == 0.0  # row_ts == t


def _result(tid: str, i: int) -> tuple[ScoreResult, TransactionEvent]:
    ev = TransactionEvent(transaction_id=tid, user_id=f"u{i}", merchant_id="m1", amount=10.0,
                          currency="EUR", channel="online", event_timestamp=END)
    vec = FeatureVector({"a": i, "b": None, "c": 0.1 * i}, {"a": 1.5}, ["b"], [])
    return ScoreResult(tid, 0.5, "review", "v-test", "svc", vec), ev


def test_sampling_is_deterministic_and_flushes_on_time(tmp_path: Path) -> None:
    ids = [f"t{i}" for i in range(400)]
    kept = {t for t in ids if sampled(t, 0.25)}
    assert 60 < len(kept) < 140 and kept == {t for t in ids if sampled(t, 0.25)}
    assert all(sampled(t, 1.0) for t in ids) and not any(sampled(t, 0.0) for t in ids)
    sink = ParquetSink(tmp_path, flush_records=10_000, flush_seconds=0.2)
    plog = PredictionLog([sink], sample=0.25)
    pairs = [_result(t, i) for i, t in enumerate(ids)]
    t0 = time.perf_counter()
    plog.record([r for r, _ in pairs], [e for _, e in pairs])
    assert time.perf_counter() - t0 < 0.5  # nothing is written on the caller's thread
    deadline = time.monotonic() + 5
    while not list(tmp_path.rglob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    files = list(tmp_path.rglob("part-*.parquet"))  # flushed by time, before close
    assert files
    plog.close()
    table = pq.read_table(files[0])
    assert set(table.column("transaction_id").to_pylist()) == kept
    assert json.loads(table.column("features")[0].as_py())["b"] is None


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_kafka_sink_delivers_and_counts_failures(kafka_bootstrap: str, unique_name: str) -> None:
    from confluent_kafka import Consumer

    from scoring.kafka_conf import consumer_conf

    pairs = [_result(f"{unique_name}-{i}", i) for i in range(5)]
    plog = PredictionLog([KafkaSink(kafka_bootstrap)])
    before = _metric("fraud_prediction_log_records_total", sink="kafka", outcome="delivered")
    plog.record([r for r, _ in pairs], [e for _, e in pairs])
    plog.close()
    assert _metric("fraud_prediction_log_records_total", sink="kafka",
                   outcome="delivered") - before == 5
    consumer = Consumer(consumer_conf(kafka_bootstrap, unique_name))
    consumer.subscribe(["predictions"])
    got: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while len(got) < 5 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            rec = json.loads(msg.value())
            if rec["transaction_id"].startswith(unique_name):
                got[rec["transaction_id"]] = rec
    consumer.close()
    assert set(got) == {r.transaction_id for r, _ in pairs}
    rec = got[f"{unique_name}-3"]
    assert rec["features"] == {"a": 3, "b": None, "c": 0.1 * 3} and rec["amount"] == 10.0
    # nobody listening: produce still returns at once, the failures are counted at delivery
    dead = KafkaSink("127.0.0.1:1", delivery_timeout_ms=300)
    failed = _metric("fraud_prediction_log_records_total", sink="kafka", outcome="failed")
    t0 = time.perf_counter()
    PredictionLog([dead]).record([r for r, _ in pairs], [e for _, e in pairs])
    assert time.perf_counter() - t0 < 0.2
    dead.close(timeout_s=5)
    assert _metric("fraud_prediction_log_records_total", sink="kafka",
                   outcome="failed") - failed == 5


# --- the skew audit -----------------------------------------------------------------------


def test_clean_log_matches_point_in_time_features(
    clean: dict[str, Any], trained_artifact: Path, tmp_path: Path
) -> None:
    code, report = _audit(clean["log_dir"], tmp_path, trained_artifact)
    assert code == 0 and report["passed"]
    assert report["records"] == len(clean["txns"])
    features = report["features"]
    assert set(features) == PROFILE | REQUEST | VELOCITY
    for name, r in features.items():
        assert r["exact"] == r["compared"] == len(clean["txns"]), (name, r["largest"])
        assert r["psi"] is not None and math.isfinite(r["psi"])
    assert report["cell_mismatch_rate"] == 0.0
    # a later window holds nothing
    code, _ = _audit(clean["log_dir"], tmp_path, trained_artifact, "--since", "2026-12-01")
    assert code == 2


@pytest.fixture
def corrupted_user(materialized_store: Any, clean: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One user's online velocity row replaced by other arrays with a newer timestamp."""
    store = materialized_store
    user = clean["users"][5]
    resp = store.get_online_features(features=[f"user_velocity_fv:{f}" for f in ROW_FIELDS],
                                     entity_rows=[{"user_id": user}])
    values = resp.to_dict()
    names = list(resp.proto.metadata.feature_names.val)
    stamp = resp.proto.results[names.index("recent_txn_ts")].event_timestamps[0]
    original = VelocityRow(user, {"row_ts_us": stamp.seconds * 1_000_000 + stamp.nanos // 1000,
                                  **{f: values[f][0] for f in ROW_FIELDS}})
    at = END + timedelta(hours=22)
    fake_ts = [to_micros(at - timedelta(minutes=m)) for m in (50, 20, 5)]
    fake = VelocityRow(user, {"row_ts_us": fake_ts[-1], "recent_txn_ts": fake_ts,
                              "recent_amounts": [900.0, 950.0, 990.0],
                              "recent_merchants": ["m-x", "m-y", "m-z"],
                              "known_merchants": ["m-x", "m-y", "m-z"],
                              "known_merchant_first_ts": fake_ts})
    assert fake.row["row_ts_us"] > original.row["row_ts_us"]
    store.write_to_online_store("user_velocity_fv", df=history_table([fake]).to_pandas())
    try:
        yield {"user": user, "at": at}
    finally:  # put the materialized row back exactly (same values, same timestamp)
        config = store.config.online_store
        config.skip_dedup = True
        try:
            store.write_to_online_store("user_velocity_fv",
                                        df=history_table([original]).to_pandas())
        finally:
            config.skip_dedup = False
        back = store.get_online_features(
            features=[f"user_velocity_fv:{f}" for f in ROW_FIELDS],
            entity_rows=[{"user_id": user}])
        assert back.to_dict()["recent_txn_ts"][0] == original.row["recent_txn_ts"]


def test_corrupted_online_row_is_reported_as_value_differs(
    corrupted_user: dict[str, Any], clean: dict[str, Any], population: dict[str, list[str]],
    trained_artifact: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(9)
    user, at = corrupted_user["user"], corrupted_user["at"]
    others = [u for u in clean["users"] if u != user][:18]
    merchants = population["merchants"]
    txns = [_txn(f"bad-{i}", user, merchants[i], at + timedelta(minutes=i), rng)
            for i in range(2)]
    txns += [_txn(f"ok-{i}", u, merchants[i % len(merchants)], at + timedelta(minutes=i), rng)
             for i, u in enumerate(others)]
    log_dir = tmp_path / "log"
    with TestClient(create_app(_settings(trained_artifact, log_dir))) as client:
        resp = client.post("/v1/score/batch", json={"transactions": txns})
        assert resp.status_code == 200
    code, report = _audit(log_dir, tmp_path, trained_artifact)
    assert code == 1 and not report["passed"]
    features = report["features"]
    for name in PROFILE | REQUEST:
        assert features[name]["mismatches"] == 0, name
    count_1h = features["user_txn_count_1h"]
    assert count_1h["mismatches"] == 2
    assert count_1h["causes"] == {"stale": 0, "missing": 0, "value_differs": 2}
    assert {w["user_id"] for w in count_1h["largest"]} == {user}
    assert report["mismatch_rate"] == pytest.approx(2 / 20)
    for name in VELOCITY:
        r = features[name]
        assert r["mismatches"] == r["causes"]["value_differs"] <= 2, name


def test_requests_before_the_online_rows_are_reported_stale(
    clean: dict[str, Any], population: dict[str, list[str]], trained_artifact: Path,
    tmp_path: Path
) -> None:
    """At SIM_END - 2 h the online profiles (taken at SIM_END) lie in the future: the scorer
    discards them while the point-in-time join uses the previous day's snapshot."""
    rng = np.random.default_rng(13)
    at = END - timedelta(hours=2)
    merchants = population["merchants"]
    txns = [_txn(f"early-{i}", u, merchants[i % len(merchants)], at + timedelta(minutes=i), rng)
            for i, u in enumerate(clean["users"][:6])]
    log_dir = tmp_path / "log"
    with TestClient(create_app(_settings(trained_artifact, log_dir))) as client:
        assert client.post("/v1/score/batch", json={"transactions": txns}).status_code == 200
    code, report = _audit(log_dir, tmp_path, trained_artifact)
    assert code == 1
    for name in PROFILE | {"txn_amount_to_mean_30d"}:
        r = report["features"][name]
        assert r["mismatches"] == r["causes"]["stale"] > 0, (name, r)
    for name in ("txn_amount_log", "txn_is_online", "txn_is_atm"):
        assert report["features"][name]["mismatches"] == 0


def test_stale_and_missing_causes() -> None:
    view = skew_audit.View("v", "user_id", ["x"], ttl_us=100, path="", timestamp_field="ts")
    cause = skew_audit._cause
    assert cause(None, True, 950, view, 1000) == "stale"  # online row outside its TTL
    assert cause(None, False, 950, view, 1000) == "missing"  # no online row
    assert cause(950, False, 800, view, 1000) == "stale"  # offline row outside its TTL
    assert cause(950, False, None, view, 1000) == "missing"  # no offline row
    assert cause(920, False, 950, view, 1000) == "stale"  # online behind offline
    assert cause(950, False, 950, view, 1000) == "value_differs"  # same row, other values
    assert cause(990, False, 950, view, 1000) == "value_differs"  # online newer


# --- drift ----------------------------------------------------------------------------------


def test_psi_identical_is_zero_and_shifted_is_large() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, 20_000)
    ref = drift.feature_reference(train)
    assert len(ref["edges"]) == 9
    assert sum(ref["proportions"]) + ref["missing"] == pytest.approx(1.0)
    assert drift.feature_psi(ref, train) == pytest.approx(0.0, abs=1e-9)
    assert drift.feature_psi(ref, rng.normal(0, 1, 5_000)) < 0.02
    assert drift.feature_psi(ref, rng.normal(1.0, 1, 5_000)) > 0.5
    half_missing = np.where(rng.random(5_000) < 0.5, np.nan, rng.normal(0, 1, 5_000))
    assert drift.feature_psi(ref, half_missing) > 1.0  # going missing is drift too
    binary = drift.feature_reference(rng.random(10_000) < 0.1)
    assert len(binary["edges"]) <= 2  # repeated quantiles collapse


def test_reference_is_saved_with_the_model_and_exported_as_gauges(
    trained_artifact: Path
) -> None:
    ref = drift.load_reference(trained_artifact)
    meta = json.loads((trained_artifact / "metadata.json").read_text())
    assert ref is not None and list(ref["features"]) == meta["features"]
    assert ref["rows"] == meta["training_window"]["train_rows"]
    for r in ref["features"].values():
        assert len(r["edges"]) <= 9
        assert sum(r["proportions"]) + r["missing"] == pytest.approx(1.0)
    rng = np.random.default_rng(2)
    mon = drift.DriftMonitor(ref, window=500, interval_s=3600, min_samples=100)
    try:
        assert mon.compute() == {}  # too few vectors yet
        # vectors drawn from the training bins themselves: no drift, except one shifted feature
        def draw(r: dict[str, Any]) -> float:
            shares = [*r["proportions"], r["missing"]]
            b = rng.choice(len(shares), p=np.array(shares) / sum(shares))
            e = r["edges"]
            if b == len(shares) - 1:
                return math.nan
            if not e:
                return 0.0
            return float(e[b]) if b < len(e) else e[-1] + 1.0  # bins are right-closed

        for _ in range(600):
            v = {f: draw(r) for f, r in ref["features"].items()}
            v["txn_amount_log"] = 50.0
            mon.observe([v])
        psi = mon.compute()
    finally:
        mon.close()
    assert psi["txn_amount_log"] > 1.0
    assert sorted(v for k, v in psi.items() if k != "txn_amount_log")[-1] < 0.1
    assert _metric("fraud_feature_psi", feature="user_txn_count_30d") == 0.0  # removed on close


# --- batch scoring -------------------------------------------------------------------------


def test_batch_scores_equal_the_online_scores(
    clean: dict[str, Any], trained_artifact: Path, tmp_path: Path
) -> None:
    tx = pd.DataFrame(clean["txns"])
    tx["event_timestamp"] = pd.to_datetime(tx["event_timestamp"], utc=True).astype(
        "datetime64[us, UTC]")
    for day, part in tx.groupby(tx["event_timestamp"].dt.strftime("%Y-%m-%d")):
        d = tmp_path / "data" / "transactions" / f"date={day}"
        d.mkdir(parents=True)
        part.to_parquet(d / "part-0.parquet", index=False)
    out = tmp_path / "scores"
    stats = batch_score.run(out, END.date(), None, 50, trained_artifact, tmp_path / "data",
                            progress=False)
    assert stats.days == [f"{END:%Y-%m-%d}", f"{END + timedelta(days=3):%Y-%m-%d}"]
    assert stats.chunks == 3
    got = pd.read_parquet(out).set_index("transaction_id")
    assert len(got) == len(tx)
    for tid, r in clean["results"].items():
        assert got.loc[tid, "score"] == pytest.approx(r["score"], rel=1e-12, abs=1e-15), tid
        assert got.loc[tid, "decision"] == r["decision"]
        assert got.loc[tid, "model_version"] == r["model_version"]


def test_incremental_batch_runs_score_each_transaction_once(
    feature_data: Path, trained_artifact: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores"
    d0, d1, d2 = (END.date() - timedelta(days=k) for k in (3, 2, 1))
    first = batch_score.run(out, d0, d1, 300, trained_artifact, progress=False)
    assert first.days == [d0.isoformat()]
    day0 = pd.read_parquet(out / f"date={d0.isoformat()}").sort_values("transaction_id")
    second = batch_score.run(out, None, d2, 300, trained_artifact, progress=False)
    # continues from the watermark's day (scored again in full, overwritten) up to d2
    assert second.days == [d0.isoformat(), d1.isoformat()]
    assert first.chunks > len(first.days)  # a day took several bounded chunks
    assert max(first.max_chunk_rows, second.max_chunk_rows) <= 300
    got = pd.read_parquet(out)
    want = read_transactions(feature_data, datetime.combine(d0, datetime.min.time(), UTC),
                             datetime.combine(d2, datetime.min.time(), UTC))
    assert got["transaction_id"].is_unique
    assert set(got["transaction_id"]) == set(want["transaction_id"])
    again = pd.read_parquet(out / f"date={d0.isoformat()}").sort_values("transaction_id")
    assert again["score"].tolist() == day0["score"].tolist()  # idempotent overwrite
    mark = json.loads((out / "_watermark.json").read_text())
    assert pd.Timestamp(mark["watermark"]) == want["event_timestamp"].max()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="no --start"):
        batch_score.run(tmp_path / "empty", None, None, 200, trained_artifact, progress=False)


def test_offline_row_times_reads_only_committed_files(tmp_path: Path) -> None:
    """A staged file still being written (or left by a crash) sits in the table's directory
    without a parquet footer: the audit reads the table's committed files, not the listing."""
    directory = tmp_path / "user_velocity"
    rows = pa.table({"user_id": ["u1", "u1"],
                     "event_timestamp": pa.array([1_000_000, 5_000_000], pa.timestamp("us", "UTC")),
                     "x": [1.0, 2.0]})
    history.append(directory, rows, history.STREAM)
    staged = directory / f"{history.ORIGIN}={history.STREAM}" / "part-00000-staged-c000.snappy.parquet"
    staged.write_bytes(b"PAR1 half-written")
    view = skew_audit.View("v", "user_id", ["x"], None, str(directory), "event_timestamp")
    got = skew_audit.offline_row_times(view, ["u1", "u1", "u2"], [4_000_000, 9_000_000, 9_000_000])
    assert got == [1_000_000, 5_000_000, None]
