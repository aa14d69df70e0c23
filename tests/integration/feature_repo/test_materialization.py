"""`feast materialize` into Redis: the online store holds the offline store's latest rows.

After the session's `materialized_store` (materialize from 2000-01-01 to the end of the
simulated log), stock `get_online_features` must return, for every key, the latest offline row
with `event_timestamp <= end` (the end is inclusive), with the same event timestamp, and None
for keys the offline store has never seen.  And a model scored online must see exactly the
features the point-in-time join gives for the same transaction.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from feature_repo import history
from feature_repo.contract import request_fields
from feature_repo.paths import features_dir, velocity_history_dir
from feature_repo.velocity import ROW_FIELDS
from scoring.artifact import service_feature_names
from tests.conftest import SIM_END
from training.retrieval import entity_frame

pytestmark = pytest.mark.integration

END = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
USER_PROFILE = [
    "user_txn_count_30d",
    "user_amount_mean_30d",
    "user_amount_std_30d",
    "user_distinct_merchants_30d",
    "user_account_age_days",
    "user_utc_offset_hours",
    "user_usual_hour_30d",
]
MERCHANT_PROFILE = ["merchant_txn_count_30d", "merchant_amount_mean_30d", "merchant_fraud_rate_30d"]


def latest_as_of(table: pd.DataFrame, key: str, end: datetime) -> pd.DataFrame:
    """The latest row per key with event_timestamp <= end (created_timestamp breaks ties)."""
    rows = table[table["event_timestamp"] <= pd.Timestamp(end)]
    order = ["event_timestamp"] + (["created_timestamp"] if "created_timestamp" in rows else [])
    return rows.sort_values(order).groupby(key).tail(1).set_index(key)


@pytest.fixture(scope="module")
def offline(feature_data: Path) -> dict[str, Any]:
    fdir = features_dir(feature_data)
    velocity = history.read(velocity_history_dir(feature_data)).to_pandas()
    # users a live stream in this session wrote online are not what materialize left there
    streamed = set(velocity.loc[velocity[history.ORIGIN] != history.BACKFILL, "user_id"])
    return {
        "user_profile": latest_as_of(pd.read_parquet(fdir / "user_profile.parquet"), "user_id",
                                     END),
        "merchant_profile": latest_as_of(pd.read_parquet(fdir / "merchant_profile.parquet"),
                                         "merchant_id", END),
        "velocity": latest_as_of(velocity, "user_id", END),
        "streamed": streamed,
    }


def online(store: Any, features: list[str], key: str, ids: list[str]) -> dict[str, Any]:
    """Values per feature, plus exact event timestamps (epoch us) per feature."""
    resp = store.get_online_features(features=features, entity_rows=[{key: i} for i in ids])
    values = resp.to_dict()
    names = list(resp.proto.metadata.feature_names.val)
    stamps = {
        name: [ts.seconds * 1_000_000 + ts.nanos // 1_000 for ts in vec.event_timestamps]
        for name, vec in zip(names, resp.proto.results, strict=True)
    }
    return {"values": values, "ts_us": stamps}


def _us(ts: pd.Timestamp) -> int:
    return int(ts.value // 1_000)


def _same(got: Any, want: Any) -> bool:
    if want is None or (isinstance(want, float) and math.isnan(want)):
        return got is None or (isinstance(got, float) and math.isnan(got))
    return got == want


def _check(result: dict[str, Any], expected: pd.DataFrame, ids: list[str],
           features: list[str]) -> int:
    checked = 0
    for i, k in enumerate(ids):
        if k not in expected.index:
            for f in features:
                assert result["values"][f][i] is None, (k, f)
                assert result["ts_us"][f][i] == 0, (k, f)
            continue
        row = expected.loc[k]
        for f in features:
            want = row[f]
            want = list(want) if isinstance(want, np.ndarray) else want
            want = None if not isinstance(want, list) and pd.isna(want) else want
            got = result["values"][f][i]
            assert _same(got, want), (k, f, got, want)
            assert result["ts_us"][f][i] == _us(row["event_timestamp"]), (k, f)
        checked += 1
    return checked


def test_user_profiles_online_equal_latest_offline(
    materialized_store: Any, offline: dict[str, Any]
) -> None:
    expected = offline["user_profile"]
    ids = sorted(expected.index) + ["u-never-seen"]
    res = online(materialized_store, [f"user_profile_fv:{f}" for f in USER_PROFILE], "user_id",
                 ids)
    assert _check(res, expected, ids, USER_PROFILE) == len(expected) > 100
    # the end of the materialization window is inclusive: the snapshot taken at END is online
    assert set(res["ts_us"]["user_txn_count_30d"][:-1]) == {_us(pd.Timestamp(END))}


def test_merchant_profiles_online_equal_latest_offline(
    materialized_store: Any, offline: dict[str, Any]
) -> None:
    expected = offline["merchant_profile"]
    ids = ["m-never-seen", *sorted(expected.index)]
    res = online(materialized_store, [f"merchant_profile_fv:{f}" for f in MERCHANT_PROFILE],
                 "merchant_id", ids)
    assert _check(res, expected, ids, MERCHANT_PROFILE) == len(expected) > 0
    assert res["values"]["merchant_fraud_rate_30d"][0] is None


def test_velocity_rows_online_equal_latest_offline(
    materialized_store: Any, offline: dict[str, Any]
) -> None:
    expected = offline["velocity"]
    ids = [u for u in sorted(expected.index) if u not in offline["streamed"]]
    ids = ids[::3] + ["u-never-seen"]  # a third of the users: arrays are large
    res = online(materialized_store, [f"user_velocity_fv:{f}" for f in ROW_FIELDS], "user_id",
                 ids)
    assert _check(res, expected, ids, list(ROW_FIELDS)) == len(ids) - 1 > 50
    # velocity rows carry microsecond event times: they survive the round trip exactly
    assert any(t % 1_000_000 for t in res["ts_us"]["recent_txn_ts"])


def test_online_service_features_equal_point_in_time_features(
    materialized_store: Any, feature_data: Path, offline: dict[str, Any]
) -> None:
    """Serving/training parity: online vs offline vectors of one transaction, all features."""
    store = materialized_store
    service = store.get_feature_service("fraud_model_v1")
    names = service_feature_names(service)
    users = [u for u in sorted(offline["velocity"].index) if u not in offline["streamed"]][:40]
    merchants = sorted(offline["merchant_profile"].index)
    rng = np.random.default_rng(3)
    at = END + timedelta(minutes=30)
    txns = pd.DataFrame(
        {
            "transaction_id": [f"parity-{i}" for i in range(len(users) + 1)],
            "user_id": [*users, "u-never-seen"],
            "merchant_id": rng.choice([*merchants, "m-never-seen"], len(users) + 1),
            "amount": np.round(rng.uniform(1, 300, len(users) + 1), 2),
            "channel": rng.choice(["online", "atm", "card_present"], len(users) + 1),
            "event_timestamp": pd.Timestamp(at),
        }
    )
    entities = entity_frame(txns)
    hist = store.get_historical_features(entity_df=entities, features=service).to_df()
    hist = hist.set_index("transaction_id").loc[entities["transaction_id"]].reset_index()
    rows = [
        {"user_id": t.user_id, "merchant_id": t.merchant_id,
         **request_fields(at, t.amount, t.merchant_id, t.channel)}
        for t in txns.itertuples()
    ]
    live = store.get_online_features(features=service, entity_rows=rows).to_dict()
    for name in names:
        got = np.array([np.nan if v is None else v for v in live[name]], dtype=float)
        want = hist[name].astype(float).to_numpy()
        assert np.allclose(got, want, rtol=1e-12, atol=0, equal_nan=True), (name, got, want)
    assert not np.isnan(hist["user_txn_count_30d"].to_numpy()[:-1]).any()
    since = hist["user_seconds_since_last_txn"].to_numpy()
    assert not np.isnan(since[:-1]).any() and np.isnan(since[-1])  # known users vs unknown
