"""Point-in-time training frames from Feast (notebook-friendly).

```python
from training.retrieval import open_store, labelled_entity_frame, training_frame
store = open_store()
frame = training_frame(store, "fraud_model_v1", labelled_entity_frame())
```
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
from feast import FeatureStore

from feature_repo.config import REPO_DIR, apply_env_defaults, data_dir
from feature_repo.contract import REQUEST_FIELDS
from feature_repo.paths import labels_path, transactions_dir
from scoring.artifact import service_feature_names

ENTITY_COLUMNS = ["transaction_id", "user_id", "merchant_id", "event_timestamp"]


def open_store(repo_path: Path = REPO_DIR) -> FeatureStore:
    """The project's FeatureStore, with environment defaults applied."""
    apply_env_defaults()
    return FeatureStore(repo_path=str(repo_path))


def read_transactions(
    root: Path | None = None, start: datetime | None = None, end: datetime | None = None
) -> pd.DataFrame:
    """Transactions with start <= event_timestamp < end (UTC-aware bounds), in log order."""
    dataset = ds.dataset(transactions_dir(root or data_dir()), format="parquet",
                         partitioning="hive")
    flt = None
    if start is not None:
        flt = ds.field("event_timestamp") >= pd.Timestamp(start)
    if end is not None:
        f2 = ds.field("event_timestamp") < pd.Timestamp(end)
        flt = f2 if flt is None else flt & f2
    df = dataset.to_table(filter=flt).to_pandas()
    return df.drop(columns=["date"], errors="ignore").reset_index(drop=True)


def entity_frame(transactions: pd.DataFrame) -> pd.DataFrame:
    """Entity rows + request data for `get_historical_features`, one row per transaction.

    The request columns are the vectorised form of `feature_repo.contract.request_fields`.
    """
    ts = pd.to_datetime(transactions["event_timestamp"], utc=True)
    out = transactions[ENTITY_COLUMNS].copy()
    out["event_timestamp"] = ts
    out["request_ts_us"] = ts.astype("datetime64[us, UTC]").astype("int64")
    out["txn_amount"] = transactions["amount"].astype("float64")
    out["txn_merchant_id"] = transactions["merchant_id"]
    out["txn_channel"] = transactions["channel"]
    if list(out.columns[4:]) != list(REQUEST_FIELDS):
        raise RuntimeError("entity_frame is out of sync with contract.REQUEST_FIELDS")
    return out


def labelled_entity_frame(
    root: Path | None = None, known_by: datetime | None = None
) -> pd.DataFrame:
    """Entity frame of every labelled transaction (labels known by `known_by`), with is_fraud."""
    root = root or data_dir()
    labels = pd.read_parquet(labels_path(root))
    if known_by is not None:
        labels = labels[labels["label_timestamp"] <= pd.Timestamp(known_by)]
    tx = read_transactions(root)
    tx = tx.merge(labels[["transaction_id", "is_fraud"]], on="transaction_id", how="inner")
    out = entity_frame(tx)
    out["is_fraud"] = tx["is_fraud"].to_numpy()
    return out


def training_frame(
    store: FeatureStore, feature_service: str, entities: pd.DataFrame,
    columns: list[str] | None = None, *, raw: bool = False,
) -> pd.DataFrame:
    """Point-in-time features of `feature_service` for every entity row, keyed by transaction_id.

    One output row per input row, none dropped or merged (checked), in the input's order.
    Columns: the entity frame's own (keys, event_timestamp, request fields, labels such as
    is_fraud), then the service's features in the model's input order.  `raw=True` keeps
    everything Feast returns, including the inputs of the on-demand views that are not model
    inputs (the velocity arrays: recent_txn_ts, recent_amounts, ...).  `columns`: only
    transaction_id and these (others are then never converted to pandas).

    The join runs on the engine `OFFLINE_ENGINE` selects (feature_repo.offline_engines:
    DuckDB in this process, or Spark); the frame is the same on both, cell for cell.
    """
    if entities["transaction_id"].duplicated().any():
        raise ValueError("entity frame has duplicate transaction_id values")
    service = store.get_feature_service(feature_service)
    job = store.get_historical_features(entity_df=entities, features=service)
    if columns is None and raw:
        df = job.to_df()
    else:
        if columns is None:
            features = service_feature_names(service)
            columns = [c for c in entities.columns if c != "transaction_id"]
            columns += [f for f in features if f not in entities.columns]
        df = job.to_arrow().select(["transaction_id", *columns]).to_pandas()
    if len(df) != len(entities):
        raise RuntimeError(f"point-in-time join returned {len(df)} rows for {len(entities)}")
    df = df.set_index("transaction_id").loc[entities["transaction_id"]].reset_index()
    return df
