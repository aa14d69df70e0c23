"""Training/serving skew: the scorer's online vector equals the point-in-time training row.

Redis holds what `feast materialize` left there at SIM_END: each key's latest row.  A training
row for a transaction at t >= SIM_END is built from the same rows (the latest at or before t,
within the view's TTL), so for such t the two must agree exactly, feature by feature.  Cases,
all at t >= SIM_END:

* ~40 labelled transactions of the log's last day (every fraud among them first), re-timed to
  SIM_END + 30 min + i s with their own user, merchant, amount and channel;
* the users whose last transaction is oldest (velocity rows long stale), at SIM_END + 30 min,
  at SIM_END + 3 days (profiles past their 2-day TTL) and an hour after their velocity rows
  passed the 30-day TTL (when the most recent user's row is still valid);
* TTL edges: t = SIM_END (row_ts == t), t = SIM_END + 2 days (t - ttl == row_ts) and one
  microsecond later;
* unknown users and merchants.

Offline: `training.retrieval.training_frame(store, "fraud_model_v1", entity_frame(...))`, the
very function training uses.  Online, both read paths: `Scorer.score` (blocking, through
Feast's `online_read`, as the stream scorer uses it) and `POST /v1/score/batch?explain=true`
(async, through the scorer's one-round-trip Redis reader, JSON on the wire).

Every online test runs twice (`online_mode`): against the session's single Redis node, and
against a 3-master Redis Cluster (`REDIS_MODE=cluster`, `tests/fixtures/redis_cluster.py`) into
which `feast materialize` wrote the same data: there the blocking path is Feast's RedisCluster
client and the async path the scorer's reader on redis-py's asyncio cluster client.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from feature_repo import history
from feature_repo.contract import TransactionEvent
from feature_repo.definitions import PROFILE_TTL, VELOCITY_TTL
from feature_repo.paths import velocity_history_dir
from scoring.loader import load_scorer
from scoring.scorer import Scorer, ScoreResult
from serving.app import create_app
from serving.config import ServingSettings
from tests.conftest import SIM_END
from training.retrieval import (
    entity_frame,
    labelled_entity_frame,
    read_transactions,
    training_frame,
)

pytestmark = pytest.mark.integration

END = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
T_S = END + timedelta(minutes=30)
US = timedelta(microseconds=1)
HOUR = timedelta(hours=1)
SAMPLE = 40
QUIET_USERS = 5
USER_PROFILE = ["user_txn_count_30d", "user_amount_mean_30d", "user_amount_std_30d",
                "user_distinct_merchants_30d", "user_account_age_days", "user_utc_offset_hours",
                "user_usual_hour_30d"]
MERCHANT_PROFILE = ["merchant_txn_count_30d", "merchant_amount_mean_30d",
                    "merchant_fraud_rate_30d"]


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def same(online: Any, offline: Any) -> bool:
    """Equal values, or both missing (None, NaN and null all mean missing)."""
    if is_missing(online) or is_missing(offline):
        return is_missing(online) and is_missing(offline)
    return math.isclose(float(online), float(offline), rel_tol=1e-12, abs_tol=1e-12)


# --- cases --------------------------------------------------------------------------------


def streamed_users(root: Path) -> set[str]:
    """Users a live stream in this session wrote online: Redis no longer holds SIM_END's row."""
    rows = history.read(velocity_history_dir(root), ["user_id", history.ORIGIN]).to_pandas()
    return set(rows.loc[rows[history.ORIGIN] != history.BACKFILL, "user_id"])


@pytest.fixture(scope="module")
def cases(feature_data: Path) -> pd.DataFrame:
    """Transactions to score: transaction_id, user_id, merchant_id, amount, currency, channel,
    event_timestamp, kind."""
    streamed = streamed_users(feature_data)
    labelled = labelled_entity_frame(feature_data)
    labelled = labelled[~labelled["user_id"].isin(streamed)]
    log = read_transactions(feature_data)
    log = log[~log["user_id"].isin(streamed)]
    last_day = labelled[labelled["event_timestamp"] >= pd.Timestamp(END - timedelta(days=1))]
    # every fraud, the last few transactions (their users' 1-hour windows are not empty at
    # T_S), then a random draw
    first = pd.concat([last_day[last_day["is_fraud"] == 1], last_day.tail(5)]).drop_duplicates(
        "transaction_id")
    rest = last_day[~last_day["transaction_id"].isin(first["transaction_id"])]
    sample = pd.concat([first, rest.sample(SAMPLE - len(first), random_state=7)])
    rows: list[dict[str, Any]] = []

    def add(kind: str, user: str, merchant: str, amount: float, channel: str,
            at: datetime) -> None:
        rows.append({"transaction_id": f"skew-{len(rows)}", "user_id": user,
                     "merchant_id": merchant, "amount": float(amount), "currency": "EUR",
                     "channel": channel, "event_timestamp": at, "kind": kind})

    for i, r in enumerate(sample.itertuples()):
        add("last_day", r.user_id, r.merchant_id, r.txn_amount, r.txn_channel,
            T_S + timedelta(seconds=i))

    last_seen = log.sort_values("event_timestamp").groupby("user_id").tail(1)
    quiet = last_seen.head(QUIET_USERS)
    busy_merchant = log["merchant_id"].value_counts().index[0]
    # an hour after the last of the quiet users' velocity rows expired
    velocity_gone = quiet["event_timestamp"].max().to_pydatetime() + VELOCITY_TTL + HOUR
    for j, r in enumerate(quiet.itertuples()):
        for kind, at in (("quiet", T_S + timedelta(minutes=5, seconds=j)),
                         ("profile_ttl_over", END + timedelta(days=3, seconds=j)),
                         ("velocity_ttl_over", velocity_gone + timedelta(seconds=j))):
            add(kind, r.user_id, busy_merchant, 75.0, "online", at)
    active = last_seen.iloc[-1]
    add("velocity_ttl_over_active", active.user_id, active.merchant_id, 12.0, "atm",
        velocity_gone)
    for kind, at in (("edge_row_ts_eq_t", END), ("edge_t_minus_ttl_eq_row_ts", END + PROFILE_TTL),
                     ("edge_just_past_ttl", END + PROFILE_TTL + US)):
        add(kind, active.user_id, active.merchant_id, 20.0, "contactless", at)
    add("unknown_user", "u-skew-unknown", busy_merchant, 30.0, "online", T_S)
    add("unknown_merchant", active.user_id, "m-skew-unknown", 30.0, "card_present", T_S)
    add("unknown_both", "u-skew-unknown-2", "m-skew-unknown", 999.0, "atm", T_S)
    frame = pd.DataFrame(rows)
    # the API refuses times more than 5 minutes ahead; every case lies in the past
    assert frame["event_timestamp"].max() < datetime.now(UTC)
    return frame


def events_of(cases: pd.DataFrame) -> list[TransactionEvent]:
    return [TransactionEvent(**{k: v for k, v in r.items() if k != "kind"})
            for r in cases.to_dict("records")]


def wire_of(cases: pd.DataFrame) -> list[dict[str, Any]]:
    return [{**{k: v for k, v in r.items() if k != "kind"},
             "event_timestamp": r["event_timestamp"].isoformat()}
            for r in cases.to_dict("records")]


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def online_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Where the scorer reads features: the session's Redis, or the materialized cluster
    (`REDIS_MODE` and `REDIS_URL` are read when the scorer opens its feature store)."""
    if request.param == "standalone":
        yield request.param
        return
    request.getfixturevalue("materialized_cluster")
    cluster = request.getfixturevalue("redis_cluster")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDIS_MODE", "cluster")
        mp.setenv("REDIS_URL", cluster.url)
        yield request.param


@pytest.fixture(scope="module")
def scorer(trained_artifact: Path, online_mode: str) -> Scorer:
    return load_scorer(ServingSettings(model_dir=trained_artifact.parent,
                                       model_version=trained_artifact.name))


@pytest.fixture(scope="module")
def offline(materialized_store: Any, cases: pd.DataFrame) -> pd.DataFrame:
    """The training frame of the cases, in their order."""
    frame = training_frame(materialized_store, "fraud_model_v1", entity_frame(cases))
    assert list(frame["transaction_id"]) == list(cases["transaction_id"])
    return frame


@pytest.fixture(scope="module")
def scored_sync(scorer: Scorer, cases: pd.DataFrame) -> list[ScoreResult]:
    """`Scorer.score`: blocking reads through Feast's `online_read` (the stream scorer's path)."""
    return scorer.score(events_of(cases))


@pytest.fixture(scope="module")
def online_sync(scored_sync: list[ScoreResult]) -> list[dict[str, Any]]:
    return [r.vector.values for r in scored_sync]


@pytest.fixture(scope="module")
def client(trained_artifact: Path, online_mode: str) -> Iterator[TestClient]:
    settings = ServingSettings(model_dir=trained_artifact.parent,
                               model_version=trained_artifact.name)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def scored_http(client: TestClient, cases: pd.DataFrame) -> list[dict[str, Any]]:
    """`POST /v1/score/batch?explain=true`: async reads (the scorer's one-round-trip reader)."""
    resp = client.post("/v1/score/batch?explain=true", json={"transactions": wire_of(cases)})
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def online_http(scored_http: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: fv["value"] for k, fv in r["features"].items()} for r in scored_http]


def mismatches(cases: pd.DataFrame, offline: pd.DataFrame, online: list[dict[str, Any]],
               features: list[str]) -> list[str]:
    out = []
    for (kind, (_, off)), vec in zip(zip(cases["kind"], offline.iterrows(), strict=True),
                                     online, strict=True):
        assert list(vec) == features
        for f in features:
            if not same(vec[f], off[f]):
                out.append(f"{off['transaction_id']} ({kind}, {off['user_id']}, "
                           f"{off['event_timestamp']}): {f} online={vec[f]!r} "
                           f"offline={off[f]!r}")
    return out


# --- the skew test ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["sync", "http"])
def test_online_vector_equals_training_row(
    path: str, request: pytest.FixtureRequest, cases: pd.DataFrame, offline: pd.DataFrame,
    scorer: Scorer,
) -> None:
    online = request.getfixturevalue(f"online_{path}")
    bad = mismatches(cases, offline, online, scorer.artifact.features)
    assert not bad, f"{len(bad)} skewed values:\n" + "\n".join(bad[:30])


def test_model_scores_the_training_row_as_the_scorer_does(
    scorer: Scorer, cases: pd.DataFrame, offline: pd.DataFrame, trained_artifact: Path
) -> None:
    model = joblib.load(trained_artifact / "model.joblib")
    x = offline[scorer.artifact.features].astype("float64").to_numpy()
    want = model.predict_proba(x)[:, 1]
    got = np.array([r.score for r in scorer.score(events_of(cases))])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# --- the comparison is not vacuous --------------------------------------------------------


def test_known_users_have_nearly_complete_vectors(
    cases: pd.DataFrame, online_sync: list[dict[str, Any]]
) -> None:
    known = [v for v, k in zip(online_sync, cases["kind"], strict=True) if k == "last_day"]
    assert len(known) == SAMPLE
    cells = [is_missing(x) for v in known for x in v.values()]
    assert sum(cells) / len(cells) < 0.02, "most features should be present for known users"
    for v in known:
        for f in [*USER_PROFILE, *MERCHANT_PROFILE, "user_seconds_since_last_txn"]:
            if f != "user_amount_std_30d":  # needs two transactions in 30 days
                assert not is_missing(v[f]), f
        assert v["user_distinct_merchants_24h"] >= 1  # their transaction of the last day
    # the velocity windows see something beyond "nothing happened"
    assert any(v["user_txn_count_1h"] > 0 for v in known)
    assert len({v["user_seconds_since_last_txn"] for v in known}) > SAMPLE // 2


def test_cases_cover_every_ttl_branch(cases: pd.DataFrame,
                                      online_sync: list[dict[str, Any]]) -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for v, k in zip(online_sync, cases["kind"], strict=True):
        by_kind.setdefault(k, []).append(v)

    def present(kind: str, names: list[str]) -> bool:
        return all(not is_missing(v[f]) for v in by_kind[kind] for f in names)

    def absent(kind: str, names: list[str]) -> bool:
        return all(is_missing(v[f]) for v in by_kind[kind] for f in names)

    since = "user_seconds_since_last_txn"
    profiles = [f for f in USER_PROFILE + MERCHANT_PROFILE if f != "user_amount_std_30d"]
    # long-quiet users: their last event is days old but still inside the velocity TTL
    assert min(v[since] for v in by_kind["quiet"]) > 5 * 86_400
    assert present("quiet", [since])
    assert absent("profile_ttl_over", USER_PROFILE + MERCHANT_PROFILE)
    assert present("profile_ttl_over", [since])
    assert absent("velocity_ttl_over", USER_PROFILE + [since])
    assert all(v["user_txn_count_1h"] == 0 for v in by_kind["velocity_ttl_over"])
    assert present("velocity_ttl_over_active", [since])
    assert by_kind["velocity_ttl_over_active"][0][since] < VELOCITY_TTL.total_seconds()
    assert present("edge_row_ts_eq_t", profiles)
    assert present("edge_t_minus_ttl_eq_row_ts", profiles)
    assert absent("edge_just_past_ttl", USER_PROFILE + MERCHANT_PROFILE)
    assert absent("unknown_user", USER_PROFILE + [since])
    assert present("unknown_user", MERCHANT_PROFILE)
    assert absent("unknown_merchant", MERCHANT_PROFILE)
    assert present("unknown_merchant", profiles[:4] + [since])
    assert absent("unknown_both", USER_PROFILE + MERCHANT_PROFILE + [since])


# --- the two online read paths --------------------------------------------------------------


def test_blocking_and_async_reads_give_the_same_vectors(
    scored_sync: list[ScoreResult], scored_http: list[dict[str, Any]]
) -> None:
    """Feast's `online_read` and the scorer's own reader: same values, ages, missing features
    and scores."""
    for s, h in zip(scored_sync, scored_http, strict=True):
        assert h["transaction_id"] == s.transaction_id
        assert h["missing_features"] == s.vector.missing, s.transaction_id
        assert h["score"] == pytest.approx(s.score, abs=1e-12)
        for name, fv in h["features"].items():
            assert same(fv["value"], s.vector.values[name]), (s.transaction_id, name)
            assert fv["age_seconds"] == s.vector.ages.get(name), (s.transaction_id, name)


def test_repeated_reads_keep_the_requested_features_fixed(scorer: Scorer,
                                                          cases: pd.DataFrame) -> None:
    """Feast's Redis store appends `_ts:<view>` to the feature-name list it is handed; the
    scorer must hand it a copy, or every request reads one more hash field than the last."""
    events = events_of(cases.head(3))
    reads = scorer.features._reads
    before = [list(r.features) for r in reads]
    first = [r.vector.values for r in scorer.score(events)]
    for _ in range(5):
        scorer.score(events)
    assert [list(r.features) for r in reads] == before
    assert not any(f.startswith("_ts:") for names in before for f in names)
    again = [r.vector.values for r in scorer.score(events)]
    assert all(same(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)


def test_the_scorer_reads_the_store_under_test(scorer: Scorer, online_mode: str,
                                               client: TestClient) -> None:
    """The cluster run is not the standalone run again: both read paths use the cluster."""
    online_store = scorer.features.store.config.online_store
    want = "redis_cluster" if online_mode == "cluster" else "redis"
    assert online_store.redis_type == want
    assert scorer.features._redis is not None  # the one-round-trip reader, on either kind
    app_store = client.app.state.models.store  # type: ignore[attr-defined]
    assert app_store.config.online_store.redis_type == want
