"""Point-in-time correctness of training data, checked against brute-force oracles.

* Feast's `get_historical_features` (through `training.retrieval.training_frame` and the
  `fraud_model_v1` service, and per view) must return, for every entity row (user, merchant,
  t), the latest feature row with `t - ttl <= feature_ts <= t`, else missing; the oracle
  here reads the raw parquet files and knows nothing of Feast.
* The velocity features must equal counts taken straight from the transaction log.
* The batch job's daily profiles must equal pandas recomputations from the transactions and
  labels (only data strictly before the snapshot; labels known strictly before it).
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from feature_repo import history
from feature_repo.contract import to_micros
from feature_repo.definitions import PROFILE_TTL, VELOCITY_TTL
from feature_repo.offline_store import JOINS
from feature_repo.paths import customers_path, features_dir, labels_path, velocity_history_dir
from feature_repo.transforms import TRANSACTION_FEATURES, transaction_features
from feature_repo.velocity import HORIZON_US, HOUR_US, MINUTE_US, ROW_FIELDS, window_features
from tests.fixtures.engines import ENGINE_PARAMS, offline_engine
from training.batch_features import MIN_RESULTANT, WINDOW_DAYS, build_profiles
from training.retrieval import entity_frame, read_transactions, training_frame
from training.simulate import SimConfig, customers, simulate, write

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
VELOCITY_OUT = [
    "user_txn_count_10m",
    "user_txn_count_1h",
    "user_amount_sum_1h",
    "user_distinct_merchants_24h",
    "user_seconds_since_last_txn",
    "user_is_new_merchant",
]
US = pd.Timedelta(microseconds=1)
DAY = pd.Timedelta(days=1)


# --- raw data and the brute-force oracle --------------------------------------------------


def _load_history(root: Path) -> pd.DataFrame:
    hist = history.read(velocity_history_dir(root)).to_pandas()  # a stock Delta reader
    for col in ROW_FIELDS:
        hist[col] = hist[col].map(list)
    return hist


@pytest.fixture(scope="module")
def raw(feature_data: Path) -> dict[str, pd.DataFrame]:
    fdir = features_dir(feature_data)
    return {
        "user_profile": pd.read_parquet(fdir / "user_profile.parquet"),
        "merchant_profile": pd.read_parquet(fdir / "merchant_profile.parquet"),
        "velocity": _load_history(feature_data),
        "tx": read_transactions(feature_data),
        "labels": pd.read_parquet(labels_path(feature_data)),
    }


def as_of(
    table: pd.DataFrame, key: str, entities: pd.DataFrame, ttl: timedelta
) -> list[pd.Series | None]:
    """For each entity row: the latest `table` row of its key with t - ttl <= ts <= t.

    Brute force: every row of the key is tested; among the candidates the greatest
    (event_timestamp, created_timestamp) wins.
    """
    def us(col: pd.Series) -> np.ndarray:
        return col.astype("datetime64[us, UTC]").astype("int64").to_numpy()

    ts_all = us(table["event_timestamp"])
    created_all = us(table["created_timestamp"]) if "created_timestamp" in table else ts_all
    by_key = {k: np.asarray(idx) for k, idx in table.groupby(key).indices.items()}
    ttl_us = ttl // timedelta(microseconds=1)
    out: list[pd.Series | None] = []
    for k, t in zip(entities[key], us(entities["event_timestamp"]), strict=True):
        rows = by_key.get(k, np.array([], dtype=int))
        ok = rows[(ts_all[rows] <= t) & (ts_all[rows] >= t - ttl_us)]
        if ok.size == 0:
            out.append(None)
            continue
        best = ok[np.lexsort((created_all[ok], ts_all[ok]))[-1]]
        out.append(table.iloc[best])
    return out


def _value(row: pd.Series | None, col: str) -> float:
    if row is None or row[col] is None or pd.isna(row[col]):
        return math.nan
    return float(row[col])


# --- entity rows ----------------------------------------------------------------------------


def _rows(users: Any, merchants: Any, ts: Any, rng: np.random.Generator, tag: str) -> pd.DataFrame:
    n = len(ts)
    return pd.DataFrame(
        {
            "transaction_id": [f"{tag}-{i}" for i in range(n)],
            "user_id": list(users),
            "merchant_id": list(merchants),
            "event_timestamp": pd.to_datetime(list(ts), utc=True).astype("datetime64[us, UTC]"),
            "amount": np.round(rng.uniform(1, 400, n), 2),
            "channel": rng.choice(["card_present", "online", "contactless", "atm"], n),
        }
    )


@pytest.fixture(scope="module")
def entities(raw: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Entity rows with ties, pre-history, stale and unknown keys, and duplicate instants."""
    rng = np.random.default_rng(20261101)
    tx, up, vel = raw["tx"], raw["user_profile"], raw["velocity"]
    users = np.array(sorted(tx["user_id"].unique()))
    merchants = np.array(sorted(tx["merchant_id"].unique()))
    first = tx.groupby("user_id")["event_timestamp"].min()
    last_row = vel.groupby("user_id")["event_timestamp"].max()
    last_snapshot = up["event_timestamp"].max()
    start, end = tx["event_timestamp"].min(), tx["event_timestamp"].max()

    def pick(a: np.ndarray, n: int) -> np.ndarray:
        return rng.choice(a, n)

    parts = []
    # 1. real transactions at their own time (ties with their own velocity row)
    real = tx.iloc[rng.choice(len(tx), 300, replace=False)]
    parts.append(real[["transaction_id", "user_id", "merchant_id", "event_timestamp", "amount",
                       "channel"]].assign(transaction_id=lambda d: "real-" + d["transaction_id"]))
    # 2. exactly at a snapshot (midnight) of that user, and 1 us before it
    snaps = up.iloc[rng.choice(len(up), 80, replace=False)]
    parts.append(_rows(snaps["user_id"], pick(merchants, 80), snaps["event_timestamp"], rng,
                       "midnight"))
    parts.append(_rows(snaps["user_id"], pick(merchants, 80), snaps["event_timestamp"] - US, rng,
                       "midnight-1us"))
    # 3. exactly at a velocity row of that user, and 1 us before it
    vrows = vel.iloc[rng.choice(len(vel), 80, replace=False)]
    parts.append(_rows(vrows["user_id"], pick(merchants, 80), vrows["event_timestamp"], rng,
                       "vrow"))
    parts.append(_rows(vrows["user_id"], pick(merchants, 80), vrows["event_timestamp"] - US, rng,
                       "vrow-1us"))
    # 4. before any data of the user (and exactly at the first transaction)
    some = pick(users, 40)
    before = [first[u] - pd.Timedelta(microseconds=int(rng.integers(1, 3 * 86_400_000_000)))
              for u in some]
    parts.append(_rows(some, pick(merchants, 40), before, rng, "before"))
    parts.append(_rows(some, pick(merchants, 40), [first[u] - US for u in some], rng,
                       "before-1us"))
    parts.append(_rows(some, pick(merchants, 40), [first[u] for u in some], rng, "first"))
    # 5. stale: days after the data, and exactly at / just past each TTL
    some = pick(users, 40)
    stale = [last_snapshot + pd.Timedelta(days=5, hours=int(rng.integers(0, 24))) for _ in some]
    parts.append(_rows(some, pick(merchants, 40), stale, rng, "stale"))
    some = pick(users, 20)
    for tag, ts in (("pttl", last_snapshot + PROFILE_TTL), ("pttl+1us", last_snapshot
                                                              + PROFILE_TTL + US)):
        parts.append(_rows(some, pick(merchants, 20), [ts] * 20, rng, tag))
    some = pick(users, 20)
    for tag, delta in (("vttl", VELOCITY_TTL), ("vttl+1us", VELOCITY_TTL + US)):
        parts.append(_rows(some, pick(merchants, 20), [last_row[u] + delta for u in some], rng,
                           tag))
    # 6. unknown user / merchant
    parts.append(_rows(["u-unknown"] * 3 + list(pick(users, 3)), list(pick(merchants, 3))
                       + ["m-unknown"] * 3, [start + DAY * 3] * 6, rng, "unknown"))
    # 7. uniformly random instants around the data
    span = (end - start) + 4 * DAY
    rnd = [start - DAY + span * float(x) for x in rng.random(200)]
    parts.append(_rows(pick(users, 200), pick(merchants, 200), rnd, rng, "random"))
    frame = pd.concat(parts, ignore_index=True)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True).astype(
        "datetime64[us, UTC]"
    )
    # 8. duplicate (user, merchant, t) with other transaction ids, amounts and channels
    dup_src = frame.iloc[rng.choice(len(frame), 40, replace=False)]
    dups = []
    for copy in range(2):
        d = dup_src.copy()
        d["transaction_id"] = d["transaction_id"] + f"-dup{copy}"
        d["amount"] = np.round(rng.uniform(1, 400, len(d)), 2)
        d["channel"] = rng.choice(["online", "atm"], len(d))
        dups.append(d)
    frame = pd.concat([frame, *dups], ignore_index=True)
    frame = frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
    assert frame["transaction_id"].is_unique
    return entity_frame(frame)


@pytest.fixture(scope="module", params=ENGINE_PARAMS)
def service_frame(store: Any, entities: pd.DataFrame, request: pytest.FixtureRequest
                  ) -> pd.DataFrame:
    """The service's training frame, on each offline engine (OFFLINE_ENGINE)."""
    with offline_engine(request.param):
        return training_frame(store, "fraud_model_v1", entities)


@pytest.fixture(scope="module")
def oracle(raw: dict[str, pd.DataFrame], entities: pd.DataFrame) -> dict[str, list]:
    return {
        "user": as_of(raw["user_profile"], "user_id", entities, PROFILE_TTL),
        "merchant": as_of(raw["merchant_profile"], "merchant_id", entities, PROFILE_TTL),
        "velocity": as_of(raw["velocity"], "user_id", entities, VELOCITY_TTL),
    }


# --- Feast point-in-time join vs the oracle ---------------------------------------------


@pytest.mark.integration
def test_one_row_per_entity_row_in_order(
    service_frame: pd.DataFrame, entities: pd.DataFrame
) -> None:
    assert len(service_frame) == len(entities)
    assert service_frame["transaction_id"].tolist() == entities["transaction_id"].tolist()
    for col in ["user_id", "merchant_id", "event_timestamp", "request_ts_us", "txn_amount"]:
        assert service_frame[col].tolist() == entities[col].tolist(), col
    dup = entities[entities["transaction_id"].str.contains("-dup")]
    assert len(dup) == 80  # duplicates of (key, instant) are separate rows, none merged


@pytest.mark.integration
def test_entity_rows_cover_the_hard_cases(
    entities: pd.DataFrame, oracle: dict[str, list]
) -> None:
    """The oracle must see hits, misses and TTL edges, or the comparisons prove little."""
    tag = kind(entities)
    user = pd.Series([r is None for r in oracle["user"]])
    vel = pd.Series([r is None for r in oracle["velocity"]])
    assert not user[tag == "pttl"].any() and user[tag == "pttl+1us"].all()
    assert not vel[tag == "vttl"].any() and vel[tag == "vttl+1us"].all()
    assert user[tag == "stale"].all() and not vel[tag == "stale"].any()
    assert user[tag == "before"].all() and vel[tag == "before"].all()
    assert not vel[tag == "first"].any()  # the first transaction's own row, at t exactly
    midnight = [r for r, k in zip(oracle["user"], tag, strict=True) if k == "midnight"]
    mts = entities.loc[tag == "midnight", "event_timestamp"]
    assert all(r is not None and r["event_timestamp"] == t for r, t in zip(midnight, mts,
                                                                          strict=True))
    assert user.sum() > 50 and (~user).sum() > 50
    assert vel.sum() > 50 and (~vel).sum() > 50


def kind(entities: pd.DataFrame) -> pd.Series:
    """The case an entity row was made for (its id prefix)."""
    ids = entities["transaction_id"].str.replace(r"-dup\d$", "", regex=True)
    return ids.str.rsplit("-", n=1).str[0]


def _assert_profile(frame: pd.DataFrame, rows: list, cols: list[str]) -> None:
    for col in cols:
        got = frame[col].astype("float64").to_numpy()
        want = np.array([_value(r, col) for r in rows])
        bad = ~np.isclose(got, want, rtol=1e-12, atol=0, equal_nan=True)
        assert not bad.any(), (
            f"{col}: {bad.sum()} rows differ, e.g.\n"
            f"{frame.loc[bad, ['transaction_id', 'user_id', 'merchant_id', 'event_timestamp']].head()}"
            f"\ngot {got[bad][:5]} want {want[bad][:5]}"
        )


@pytest.mark.integration
def test_user_profile_is_the_latest_snapshot_within_ttl(
    service_frame: pd.DataFrame, oracle: dict[str, list]
) -> None:
    _assert_profile(service_frame, oracle["user"], USER_PROFILE)


@pytest.mark.integration
def test_merchant_profile_is_the_latest_snapshot_within_ttl(
    service_frame: pd.DataFrame, oracle: dict[str, list]
) -> None:
    _assert_profile(service_frame, oracle["merchant"], MERCHANT_PROFILE)


def _expected_velocity(rows: list, entities: pd.DataFrame) -> pd.DataFrame:
    out = []
    for r, t, m in zip(rows, entities["request_ts_us"], entities["txn_merchant_id"], strict=True):
        args = [None] * len(ROW_FIELDS) if r is None else [r[f] for f in ROW_FIELDS]
        out.append(window_features(*args, request_ts_us=int(t), merchant_id=m))
    return pd.DataFrame(out)


@pytest.mark.integration
def test_velocity_features_are_windows_of_the_as_of_row(
    service_frame: pd.DataFrame, entities: pd.DataFrame, oracle: dict[str, list]
) -> None:
    want = _expected_velocity(oracle["velocity"], entities)
    for col in VELOCITY_OUT:
        got = service_frame[col].astype("float64").to_numpy()
        exp = want[col].astype("float64").to_numpy()
        bad = ~np.isclose(got, exp, rtol=1e-12, atol=1e-9, equal_nan=True)
        assert not bad.any(), (col, service_frame.loc[bad, "transaction_id"].head().tolist())


@pytest.mark.integration
def test_transaction_features_use_the_as_of_profile_and_own_request(
    service_frame: pd.DataFrame, entities: pd.DataFrame, oracle: dict[str, list]
) -> None:
    want = pd.DataFrame(
        [
            transaction_features(a, c, int(t), _value(r, "user_amount_mean_30d"),
                                 _value(r, "user_amount_std_30d"),
                                 _value(r, "user_utc_offset_hours"),
                                 _value(r, "user_usual_hour_30d"))
            for a, c, t, r in zip(entities["txn_amount"], entities["txn_channel"],
                                  entities["request_ts_us"], oracle["user"], strict=True)
        ]
    )
    for col in TRANSACTION_FEATURES:
        got = service_frame[col].astype("float64").to_numpy()
        exp = want[col].astype("float64").to_numpy()
        assert np.allclose(got, exp, rtol=1e-12, atol=0, equal_nan=True), col
    # duplicates of one instant keep their own request data (nothing mixed between rows)
    dup = entities["transaction_id"].str.contains("-dup")
    assert service_frame.loc[dup, "txn_amount_log"].tolist() == pytest.approx(
        np.log1p(entities.loc[dup, "txn_amount"]).tolist()
    )


@pytest.mark.integration
def test_velocity_view_returns_the_as_of_row_and_nothing_later(
    store: Any, entities: pd.DataFrame, oracle: dict[str, list]
) -> None:
    refs = [f"user_velocity_fv:{f}" for f in ROW_FIELDS]
    df = store.get_historical_features(entity_df=entities, features=refs).to_df()
    assert len(df) == len(entities)
    df = df.set_index("transaction_id").loc[entities["transaction_id"]]
    for r, (_, got), t in zip(oracle["velocity"], df.iterrows(), entities["request_ts_us"],
                              strict=True):
        if r is None:
            assert all(got[f] is None or np.size(got[f]) == 0 for f in ROW_FIELDS), got.name
            continue
        for f in ROW_FIELDS:
            assert list(got[f]) == r[f], (got.name, f)
        assert max(got["recent_txn_ts"]) <= t  # no event after the entity's time
        assert min(got["known_merchant_first_ts"]) <= t


@pytest.mark.integration
def test_single_views_agree_with_the_service(
    store: Any, entities: pd.DataFrame, service_frame: pd.DataFrame
) -> None:
    refs = [f"user_profile_fv:{c}" for c in USER_PROFILE] + [
        f"merchant_profile_fv:{c}" for c in MERCHANT_PROFILE
    ]
    df = store.get_historical_features(entity_df=entities, features=refs).to_df()
    df = df.set_index("transaction_id").loc[entities["transaction_id"]].reset_index()
    for col in USER_PROFILE + MERCHANT_PROFILE:
        assert np.allclose(df[col].astype(float), service_frame[col].astype(float),
                           equal_nan=True, rtol=0, atol=0), col


@pytest.mark.integration
def test_training_frame_rejects_duplicate_transaction_ids(
    store: Any, entities: pd.DataFrame
) -> None:
    bad = pd.concat([entities.head(3), entities.head(1)], ignore_index=True)
    with pytest.raises(ValueError, match="duplicate transaction_id"):
        training_frame(store, "fraud_model_v1", bad)


# --- velocity features vs the raw transaction log --------------------------------------


@pytest.mark.integration
def test_velocity_features_equal_counts_from_the_log(
    raw: dict[str, pd.DataFrame], entities: pd.DataFrame, service_frame: pd.DataFrame
) -> None:
    """End to end (backfill + join + on-demand view) against the log itself."""
    tx = raw["tx"]
    streamed = set(raw["velocity"].loc[raw["velocity"][history.ORIGIN] != history.BACKFILL,
                                       "user_id"])
    ts_us = tx["event_timestamp"].astype("datetime64[us, UTC]").astype("int64")
    log = {u: (ts_us[g.index].to_numpy(), g["amount"].to_numpy(), g["merchant_id"].to_numpy())
           for u, g in tx.groupby("user_id")}
    ttl_us = VELOCITY_TTL // timedelta(microseconds=1)
    checked = 0
    for (_, e), (_, got) in zip(entities.iterrows(), service_frame.iterrows(), strict=True):
        if e["user_id"] in streamed:
            continue  # rows written by a live stream in this session are not in the log
        t = int(e["request_ts_us"])
        ts, amounts, merchants = log.get(e["user_id"], (np.array([], int), [], []))
        prior = ts < t
        # the state row holding them is the one of the last event <= t; beyond the TTL it
        # is gone and the user looks new
        seen = ts[ts <= t]
        if seen.size == 0 or seen.max() < t - ttl_us:
            prior = np.zeros_like(prior)
        w10 = prior & (ts >= t - 10 * MINUTE_US)
        w1h = prior & (ts >= t - HOUR_US)
        w24 = prior & (ts >= t - HORIZON_US)
        want = {
            "user_txn_count_10m": int(w10.sum()),
            "user_txn_count_1h": int(w1h.sum()),
            "user_amount_sum_1h": float(np.sum(np.asarray(amounts)[w1h])) if w1h.any() else 0.0,
            "user_distinct_merchants_24h": len(set(np.asarray(merchants)[w24])),
            "user_seconds_since_last_txn": (t - ts[prior].max()) / 1e6 if prior.any() else math.nan,
            "user_is_new_merchant": int(e["txn_merchant_id"] not in set(np.asarray(merchants)[prior])),
        }
        for k, v in want.items():
            g = float(got[k])
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(g), (e["transaction_id"], k)
            else:
                assert g == pytest.approx(v, rel=1e-9, abs=1e-6), (e["transaction_id"], k, g, v)
        checked += 1
    assert checked > 0.8 * len(entities)


# --- the batch job vs pandas --------------------------------------------------------------


def _window(rows: pd.DataFrame, d: pd.Timestamp) -> pd.DataFrame:
    """Transactions in the 30 days strictly before snapshot d."""
    ts = rows["event_timestamp"]
    return rows[(ts >= d - pd.Timedelta(days=WINDOW_DAYS)) & (ts < d)]


def _usual_hour(w: pd.DataFrame) -> float:
    """Circular mean of the UTC hours of w's transactions (NaN: none, or they cancel out)."""
    us = w["event_timestamp"].astype("datetime64[us, UTC]").astype("int64").to_numpy()
    angle = (us % (24 * HOUR_US)) * 2 * math.pi / (24 * HOUR_US)
    hs, hc = float(np.sin(angle).sum()), float(np.cos(angle).sum())
    if not len(w) or math.hypot(hs, hc) <= MIN_RESULTANT * len(w):
        return math.nan
    return (math.atan2(hs, hc) * 12 / math.pi + 24) % 24


def user_profile_oracle(mine: pd.DataFrame, d: pd.Timestamp,
                        offsets: dict[str, float] | None = None) -> dict[str, float]:
    """The user's profile at d from all of the user's transactions (and customer records)."""
    w = _window(mine, d)
    c = len(w)
    return {
        "user_txn_count_30d": c,
        "user_amount_mean_30d": w["amount"].mean() if c else math.nan,
        "user_amount_std_30d": w["amount"].std(ddof=1) if c > 1 else math.nan,
        "user_distinct_merchants_30d": w["merchant_id"].nunique(),
        "user_account_age_days": (d - mine["event_timestamp"].min()) / pd.Timedelta(days=1),
        "user_utc_offset_hours": (offsets or {}).get(mine["user_id"].iloc[0], math.nan),
        "user_usual_hour_30d": _usual_hour(w),
    }


def merchant_profile_oracle(mine: pd.DataFrame, d: pd.Timestamp) -> dict[str, float]:
    """The merchant's profile at d from its transactions joined with their labels."""
    w = _window(mine, d)
    c = len(w)
    known_fraud = (w["is_fraud"] == 1) & (w["label_timestamp"] < d)
    return {
        "merchant_txn_count_30d": c,
        "merchant_amount_mean_30d": w["amount"].mean() if c else math.nan,
        "merchant_fraud_rate_30d": known_fraud.sum() / c if c else math.nan,
    }


def _check_profiles(root: Path, n_rows: int, seed: int) -> dict[str, int]:
    """Compare the batch job's output under root with the pandas oracle; return coverage."""
    tx = read_transactions(root).merge(pd.read_parquet(labels_path(root)), on="transaction_id",
                                       how="left")
    up = pd.read_parquet(features_dir(root) / "user_profile.parquet")
    mp = pd.read_parquet(features_dir(root) / "merchant_profile.parquet")
    last_snapshot = tx["event_timestamp"].max().floor("D") + DAY
    stats = {"window_drops_old": 0, "label_not_yet_known": 0, "fraud_rate_positive": 0}
    rng = np.random.default_rng(seed)

    cust = customers_path(root)
    offsets = (pd.read_parquet(cust).set_index("user_id")["home_utc_offset_hours"].to_dict()
               if cust.exists() else {})

    def user_oracle(mine: pd.DataFrame, d: pd.Timestamp) -> dict[str, float]:
        return user_profile_oracle(mine, d, offsets)

    for table, key, oracle in ((up, "user_id", user_oracle),
                               (mp, "merchant_id", merchant_profile_oracle)):
        assert not table.duplicated([key, "event_timestamp"]).any()
        assert (table["event_timestamp"] == table["event_timestamp"].dt.floor("D")).all()
        log = dict(tuple(tx.groupby(key)))
        snapshots = dict(tuple(table.groupby(key)))
        assert snapshots.keys() == log.keys()
        # one snapshot per midnight strictly after the key's first transaction, to the end
        for k, mine in log.items():
            first = mine["event_timestamp"].min()
            expected = pd.date_range(first.floor("D") + DAY, last_snapshot, freq="D", tz="UTC")
            assert snapshots[k]["event_timestamp"].sort_values().tolist() == list(expected), k
        sample = table.iloc[rng.choice(len(table), min(n_rows, len(table)), replace=False)]
        for _, row in sample.iterrows():
            d, mine = row["event_timestamp"], log[row[key]]
            for col, v in oracle(mine, d).items():
                assert _close(row[col], v), (row[key], d, col, row[col], v)
            old = mine["event_timestamp"] < d - pd.Timedelta(days=WINDOW_DAYS)
            stats["window_drops_old"] += int(old.any())
            w = _window(mine, d)
            stats["label_not_yet_known"] += int(
                ((w["is_fraud"] == 1) & (w["label_timestamp"] >= d)).any())
            if key == "merchant_id":
                stats["fraud_rate_positive"] += int(row["merchant_fraud_rate_30d"] > 0)
    return stats


def _close(got: Any, want: float) -> bool:
    if want is None or (isinstance(want, float) and math.isnan(want)):
        return got is None or pd.isna(got)
    return not pd.isna(got) and math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.integration
def test_batch_profiles_of_the_session_data_match_pandas(feature_data: Path) -> None:
    stats = _check_profiles(feature_data, n_rows=200, seed=1)
    assert stats["label_not_yet_known"] > 0  # the label cut-off was exercised
    assert stats["fraud_rate_positive"] > 0


def test_batch_profiles_over_a_sliding_30_day_window_match_pandas(tmp_path: Path) -> None:
    """A longer private log, so the 30-day window really slides past old transactions."""
    cfg = SimConfig(users=120, days=45, seed=5, end=date(2026, 6, 1))
    tx, labels = simulate(cfg)
    write(tx, labels, tmp_path, customers(cfg))
    build_profiles(tmp_path)
    stats = _check_profiles(tmp_path, n_rows=200, seed=2)
    assert stats["window_drops_old"] > 20
    assert stats["label_not_yet_known"] > 0


def test_batch_profile_boundaries(tmp_path: Path) -> None:
    """Hand-made log: transactions and labels exactly at the window and snapshot edges."""
    d = pd.Timestamp("2026-03-31", tz="UTC")
    w = pd.Timedelta(days=WINDOW_DAYS)
    events = [  # (txn, user, merchant, ts, amount, fraud, label_ts)
        ("t0", "ua", "mx", d - w - US, 1.0, 1, d - w),  # just outside the window
        ("t1", "ua", "my", d - w, 2.0, 1, d - US),  # exactly at d-30d: inside; label known
        ("t2", "ua", "mx", d - DAY, 4.0, 1, d),  # label at d exactly: not known at d
        ("t3", "ua", "mx", d - US, 8.0, 0, d + 3 * DAY),  # 1 us before d: inside
        ("t4", "ua", "mz", d, 16.0, 0, d + 3 * DAY),  # at d: not before d
        ("t5", "ub", "my", d + DAY, 32.0, 0, d + 4 * DAY),
    ]
    tx = pd.DataFrame(
        {
            "transaction_id": [e[0] for e in events],
            "user_id": [e[1] for e in events],
            "merchant_id": [e[2] for e in events],
            "amount": [e[4] for e in events],
            "currency": "EUR",
            "channel": "online",
            "event_timestamp": pd.to_datetime([e[3] for e in events], utc=True).astype(
                "datetime64[us, UTC]"),
        }
    ).sort_values("event_timestamp", ignore_index=True)
    labels = pd.DataFrame(
        {
            "transaction_id": [e[0] for e in events],
            "is_fraud": np.array([e[5] for e in events], dtype="int8"),
            "label_timestamp": pd.to_datetime([e[6] for e in events], utc=True).astype(
                "datetime64[us, UTC]"),
        }
    )
    write(tx, labels, tmp_path)
    build_profiles(tmp_path)
    up = pd.read_parquet(features_dir(tmp_path) / "user_profile.parquet")
    mp = pd.read_parquet(features_dir(tmp_path) / "merchant_profile.parquet")
    ua = up[(up["user_id"] == "ua") & (up["event_timestamp"] == d)].iloc[0]
    assert ua["user_txn_count_30d"] == 3  # t1, t2, t3
    assert ua["user_amount_mean_30d"] == pytest.approx(14.0 / 3)
    assert ua["user_amount_std_30d"] == pytest.approx(float(np.std([2.0, 4.0, 8.0], ddof=1)))
    assert ua["user_distinct_merchants_30d"] == 2  # my, mx (mz is at d)
    assert ua["user_account_age_days"] == pytest.approx((w + US) / DAY)
    mx = mp[(mp["merchant_id"] == "mx") & (mp["event_timestamp"] == d)].iloc[0]
    assert mx["merchant_txn_count_30d"] == 2  # t2, t3 (t0 is outside)
    assert mx["merchant_fraud_rate_30d"] == 0.0  # t2's label comes at d, t0 is outside
    my = mp[(mp["merchant_id"] == "my") & (mp["event_timestamp"] == d)].iloc[0]
    assert my["merchant_fraud_rate_30d"] == 1.0  # t1 at d-30d, label known 1 us before d
    mx_next = mp[(mp["merchant_id"] == "mx") & (mp["event_timestamp"] == d + DAY)].iloc[0]
    assert mx_next["merchant_txn_count_30d"] == 2  # t2, t3 (t0 left the window long ago)
    assert mx_next["merchant_fraud_rate_30d"] == 0.5  # now t2's label is known
    # the day after: t1 (at d-30d) drops out of ua's window, t4 enters
    ua1 = up[(up["user_id"] == "ua") & (up["event_timestamp"] == d + DAY)].iloc[0]
    assert ua1["user_txn_count_30d"] == 3  # t2, t3, t4
    assert ua1["user_distinct_merchants_30d"] == 2  # mx, mz
    # ub has no snapshot until the day after its first transaction
    assert up.loc[up["user_id"] == "ub", "event_timestamp"].min() == d + 2 * DAY


def test_profile_snapshots_never_at_or_before_first_transaction(tmp_path: Path) -> None:
    start = datetime(2026, 5, 1, tzinfo=UTC)
    tx = pd.DataFrame(
        {
            "transaction_id": ["a", "b"],
            "user_id": ["u1", "u1"],
            "merchant_id": ["m1", "m1"],
            "amount": [1.0, 2.0],
            "currency": "EUR",
            "channel": "atm",
            "event_timestamp": pd.to_datetime([start, start + timedelta(hours=30)],
                                              utc=True).astype("datetime64[us, UTC]"),
        }
    )
    labels = pd.DataFrame({"transaction_id": ["a", "b"], "is_fraud": np.array([0, 0], "int8"),
                           "label_timestamp": tx["event_timestamp"] + pd.Timedelta(days=3)})
    write(tx, labels, tmp_path)
    build_profiles(tmp_path)
    up = pd.read_parquet(features_dir(tmp_path) / "user_profile.parquet")
    # first transaction exactly at midnight: that midnight is not strictly after it
    assert up["event_timestamp"].tolist() == [pd.Timestamp(start) + DAY, pd.Timestamp(start)
                                              + 2 * DAY]
    assert up["user_txn_count_30d"].tolist() == [1, 2]
    assert to_micros(start) % (24 * HOUR_US) == 0


# --- the ASOF offline store's join itself, on adversarial synthetic tables ------------------


def _view(tmp_path: Path, name: str, key: str, table: pd.DataFrame, ttl: timedelta,
          created: bool) -> Any:
    """A FeatureView over a private parquet file (no registry needed for the join)."""
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, String

    path = tmp_path / f"{name}.parquet"
    table.to_parquet(path, index=False)
    source = FileSource(
        name=f"{name}_source", path=str(path), timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp" if created else "",
    )
    return FeatureView(
        name=name,
        entities=[Entity(name=key, join_keys=[key], value_type=ValueType.STRING)],
        ttl=ttl,
        schema=[Field(name=key, dtype=String), Field(name=f"{name}_v", dtype=Float64)],
        source=source,
    )


def _ts(*values: Any) -> pd.Series:
    return pd.Series(pd.to_datetime(list(values), utc=True)).astype("datetime64[us, UTC]")


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_asof_join_edge_cases(tmp_path: Path, engine: str) -> None:
    asof_join = JOINS[engine]
    h = pd.Timestamp("2026-10-20 10:00", tz="UTC")
    m = pd.Timedelta(minutes=1)
    table = pd.DataFrame(
        {
            "k": ["a", "a", "a", "a", "a", "b"],
            "event_timestamp": _ts(h, h, h + 60 * m, h + 120 * m, h + 240 * m, h + 30 * m),
            # two rows at the same instant: the later-created one wins
            "created_timestamp": _ts(h, h + 5 * m, h + 60 * m, h + 120 * m, h + 240 * m,
                                     h + 30 * m),
            "fa_v": [1.0, 2.0, 3.0, None, 5.0, 7.0],
        }
    )
    fv = _view(tmp_path, "fa", "k", table, timedelta(hours=1), created=True)
    cases = [  # (key, t, expected)
        ("a", h - US, None),  # before any row
        ("a", h, 2.0),  # tie with the feature row; newest created wins
        ("a", h + 60 * m - US, 2.0),
        ("a", h + 60 * m, 3.0),
        ("a", h + 150 * m, None),  # the latest row holds a null: null, not an older value
        ("a", h + 300 * m, 5.0),  # exactly ttl after the row: still fresh
        ("a", h + 300 * m + US, None),  # 1 us past the ttl: stale
        ("b", h + 90 * m, 7.0),
        ("b", h + 90 * m + US, None),
        ("zz", h, None),  # unknown key
        ("a", h, 2.0),  # duplicate entity rows are kept, each joined
        ("a", h, 2.0),
    ]
    entities = pd.DataFrame(
        {
            "k": [c[0] for c in cases],
            "event_timestamp": _ts(*[c[1] for c in cases]),
            "txn": [f"x{i}" for i in range(len(cases))],
        }
    )
    out = asof_join(entities, [fv], ["fa:fa_v"], full_feature_names=False).to_pandas()
    assert out["txn"].tolist() == entities["txn"].tolist()  # one row each, input order
    got = [None if pd.isna(v) else v for v in out["fa_v"]]
    assert got == [c[2] for c in cases]


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
@pytest.mark.parametrize("seed", [0])
def test_asof_join_matches_brute_force_on_random_tables(tmp_path: Path, seed: int,
                                                        engine: str) -> None:
    """Two views (one with created timestamps and ttl, one without ttl) vs the oracle."""
    asof_join = JOINS[engine]
    rng = np.random.default_rng(seed)
    base = pd.Timestamp("2026-10-01", tz="UTC")
    grid = [base + pd.Timedelta(minutes=int(x)) for x in range(0, 600, 7)]  # coarse: many ties

    def table(key: str, name: str, n: int, keys: list[str], created: bool) -> pd.DataFrame:
        t = pd.DataFrame({key: rng.choice(keys, n), "event_timestamp": _ts(*rng.choice(grid, n)),
                          f"{name}_v": np.round(rng.normal(size=n), 6)})
        t.loc[rng.random(n) < 0.1, f"{name}_v"] = np.nan
        if created:  # distinct created times, so "newest created" is well defined
            t["created_timestamp"] = t["event_timestamp"] + pd.to_timedelta(
                rng.permutation(n), unit="s")
        else:
            t = t.drop_duplicates([key, "event_timestamp"])
        return t

    users = [f"u{i}" for i in range(8)]
    shops = [f"s{i}" for i in range(5)]
    t1 = table("user_id", "fu", 400, users, created=True)
    t2 = table("shop_id", "fs", 150, shops, created=False)
    fv1 = _view(tmp_path, "fu", "user_id", t1, timedelta(minutes=45), created=True)
    fv2 = _view(tmp_path, "fs", "shop_id", t2, timedelta(0), created=False)  # 0 = no expiry
    n = 600
    ts = [*rng.choice(grid, n // 2),  # exact ties with feature rows
          *(base + pd.to_timedelta(rng.integers(-60, 700 * 60, n - n // 2), unit="s"))]
    entities = pd.DataFrame(
        {
            "user_id": rng.choice([*users, "u-none"], n),
            "shop_id": rng.choice([*shops, "s-none"], n),
            "event_timestamp": _ts(*ts),
            "row": np.arange(n),
        }
    )
    out = asof_join(entities, [fv1, fv2], ["fu:fu_v", "fs:fs_v"], False).to_pandas()
    assert out["row"].tolist() == list(range(n))
    for col, tbl, key, ttl in (("fu_v", t1, "user_id", timedelta(minutes=45)),
                               ("fs_v", t2, "shop_id", timedelta(days=10_000))):
        want = np.array([_value(r, col) for r in as_of(tbl, key, entities, ttl)])
        got = out[col].astype(float).to_numpy()
        assert np.array_equal(got, want, equal_nan=True), col
        assert np.isnan(want).any() and (~np.isnan(want)).sum() > n // 4
