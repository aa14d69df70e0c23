"""Feast definitions: entities, then sources, then views, then services (read top to bottom).

Paths point under `$FRAUD_DATA_DIR` (default `<project>/data`) as absolute paths, because
Feast's DuckDB offline store opens file sources relative to the current directory.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from feast import (
    Entity,
    FeatureService,
    FeatureView,
    Field,
    FileSource,
    PushSource,
    RequestSource,
    ValueType,
)
from feast.data_format import ParquetFormat
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Array, Float64, Int64, String

from feature_repo.config import data_dir

FEATURES_DIR = data_dir() / "features"

# Batch profile snapshots are written daily at 00:00 UTC; a snapshot older than this is stale.
PROFILE_TTL = timedelta(days=2)
# Velocity rows carry raw event times and are windowed at request time, so they stay valid long.
VELOCITY_TTL = timedelta(days=30)

# --- entities -----------------------------------------------------------------------------

# The card holder whose transactions are scored.
user = Entity(
    name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="Card holder"
)
# The merchant where the card is used.
merchant = Entity(
    name="merchant", join_keys=["merchant_id"], value_type=ValueType.STRING, description="Merchant"
)

# --- sources ------------------------------------------------------------------------------

# Daily user profiles written by `python -m training.batch_features`.
user_profile_source = FileSource(
    name="user_profile_source",
    path=str(FEATURES_DIR / "user_profile.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
)
# Daily merchant profiles written by the same job.
merchant_profile_source = FileSource(
    name="merchant_profile_source",
    path=str(FEATURES_DIR / "merchant_profile.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
)
# Offline history of the velocity rows: appended by the live dataflow, replayed by the backfill.
user_velocity_source = FileSource(
    name="user_velocity_source",
    path=str(FEATURES_DIR / "user_velocity"),  # a Delta table: read its files via feature_repo.history
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
)
# Where the stream pushes velocity rows; its batch source is the history above.
user_velocity_push_source = PushSource(
    name="user_velocity_push_source", batch_source=user_velocity_source
)
# What the caller sends with each transaction to be scored (see feature_repo.contract).
transaction_request_source = RequestSource(
    name="transaction_request_source",
    schema=[
        Field(name="request_ts_us", dtype=Int64),
        Field(name="txn_amount", dtype=Float64),
        Field(name="txn_merchant_id", dtype=String),
        Field(name="txn_channel", dtype=String),
    ],
)

# --- feature views -------------------------------------------------------------------------

# 30-day habits of a user, as of each day's 00:00 UTC (only data strictly before it), and the
# card holder's home time zone: what "usual" means for this user, amounts and hours alike.
user_profile_fv = FeatureView(
    name="user_profile_fv",
    entities=[user],
    ttl=PROFILE_TTL,
    schema=[
        Field(name="user_txn_count_30d", dtype=Int64),
        Field(name="user_amount_mean_30d", dtype=Float64),
        Field(name="user_amount_std_30d", dtype=Float64),
        Field(name="user_distinct_merchants_30d", dtype=Int64),
        Field(name="user_account_age_days", dtype=Float64),
        Field(name="user_utc_offset_hours", dtype=Float64),
        Field(name="user_usual_hour_30d", dtype=Float64),
    ],
    source=user_profile_source,
    online=True,
)
# 30-day volume and known fraud rate of a merchant, as of each day's 00:00 UTC.
merchant_profile_fv = FeatureView(
    name="merchant_profile_fv",
    entities=[merchant],
    ttl=PROFILE_TTL,
    schema=[
        Field(name="merchant_txn_count_30d", dtype=Int64),
        Field(name="merchant_amount_mean_30d", dtype=Float64),
        Field(name="merchant_fraud_rate_30d", dtype=Float64),
    ],
    source=merchant_profile_source,
    online=True,
)
# Each user's recent raw events (feature_repo.velocity), fed by the stream.
user_velocity_fv = FeatureView(
    name="user_velocity_fv",
    entities=[user],
    ttl=VELOCITY_TTL,
    schema=[
        Field(name="recent_txn_ts", dtype=Array(Int64)),
        Field(name="recent_amounts", dtype=Array(Float64)),
        Field(name="recent_merchants", dtype=Array(String)),
        Field(name="known_merchants", dtype=Array(String)),
        Field(name="known_merchant_first_ts", dtype=Array(Int64)),
    ],
    source=user_velocity_push_source,
    online=True,
)


# Velocity windows relative to the transaction's own time: same function in training and serving.
@on_demand_feature_view(
    sources=[user_velocity_fv, transaction_request_source],
    schema=[
        Field(name="user_txn_count_10m", dtype=Int64),
        Field(name="user_txn_count_1h", dtype=Int64),
        Field(name="user_amount_sum_1h", dtype=Float64),
        Field(name="user_distinct_merchants_24h", dtype=Int64),
        Field(name="user_seconds_since_last_txn", dtype=Float64),
        Field(name="user_is_new_merchant", dtype=Int64),
    ],
    mode="python",
)
def user_velocity_odfv(inputs: dict[str, Any]) -> dict[str, Any]:
    # Feast runs this body from its source text: imports must live inside it.
    from feature_repo.velocity import WINDOW_FEATURES, window_features

    rows = [
        window_features(ts, amounts, merchants, known, first, t, m)
        for ts, amounts, merchants, known, first, t, m in zip(
            inputs["recent_txn_ts"],
            inputs["recent_amounts"],
            inputs["recent_merchants"],
            inputs["known_merchants"],
            inputs["known_merchant_first_ts"],
            inputs["request_ts_us"],
            inputs["txn_merchant_id"],
            strict=True,
        )
    ]
    return {name: [r[name] for r in rows] for name in WINDOW_FEATURES}


# The transaction against the card holder's own habits: amount vs their 30-day mean, time of day
# in their home zone and hours from their usual hour (never the server's UTC clock), channel.
@on_demand_feature_view(
    sources=[user_profile_fv, transaction_request_source],
    schema=[
        Field(name="txn_amount_log", dtype=Float64),
        Field(name="txn_amount_to_mean_30d", dtype=Float64),
        Field(name="txn_amount_zscore_30d", dtype=Float64),
        Field(name="txn_hour_local", dtype=Float64),
        Field(name="txn_hours_from_usual_30d", dtype=Float64),
        Field(name="txn_is_online", dtype=Int64),
        Field(name="txn_is_atm", dtype=Int64),
    ],
    mode="python",
)
def transaction_odfv(inputs: dict[str, Any]) -> dict[str, Any]:
    from feature_repo.transforms import TRANSACTION_FEATURES, transaction_features

    rows = [
        transaction_features(a, c, t, m, s, z, u)
        for a, c, t, m, s, z, u in zip(
            inputs["txn_amount"],
            inputs["txn_channel"],
            inputs["request_ts_us"],
            inputs["user_amount_mean_30d"],
            inputs["user_amount_std_30d"],
            inputs["user_utc_offset_hours"],
            inputs["user_usual_hour_30d"],
            strict=True,
        )
    ]
    return {name: [r[name] for r in rows] for name in TRANSACTION_FEATURES}


# --- feature services ----------------------------------------------------------------------

# Inputs of fraud model v1: the model artifact records this name and its ordered features.
fraud_model_v1 = FeatureService(
    name="fraud_model_v1",
    features=[
        user_profile_fv,
        merchant_profile_fv,
        user_velocity_odfv,
        transaction_odfv,
    ],
    description="Card fraud model v1: profiles, stream velocity, request features",
)
# The same model without stream velocity, to measure what the velocity features add.
fraud_model_v1_no_velocity = FeatureService(
    name="fraud_model_v1_no_velocity",
    features=[user_profile_fv, merchant_profile_fv, transaction_odfv],
    description="Ablation of fraud_model_v1 without the velocity features",
)
