"""The scaling curve's entity rows: distinct transactions, each copy a consistent earlier query."""

from __future__ import annotations

import pandas as pd

from bench.engine_scaling import SHIFT, repeated_entity_rows


def _labelled(n: int) -> pd.DataFrame:
    ts = pd.date_range("2026-11-01", periods=n, freq="7min", tz="UTC")
    return pd.DataFrame({
        "transaction_id": [f"t{i}" for i in range(n)],
        "user_id": [f"u{i % 3}" for i in range(n)],
        "merchant_id": [f"m{i % 5}" for i in range(n)],
        "event_timestamp": ts,
        "request_ts_us": ts.astype("datetime64[us, UTC]").astype("int64"),
        "txn_amount": [float(i) for i in range(n)],
        "is_fraud": [i % 2 for i in range(n)],
    })


def test_up_to_the_labelled_rows_a_sample_of_them() -> None:
    labelled = _labelled(10)
    out = repeated_entity_rows(labelled, 4)
    assert len(out) == 4
    assert set(out["transaction_id"]) <= set(labelled["transaction_id"])
    assert out.equals(repeated_entity_rows(labelled, 4))  # seeded


def test_beyond_them_copies_asked_earlier() -> None:
    labelled = _labelled(10)
    out = repeated_entity_rows(labelled, 25)
    assert len(out) == 25
    assert not out["transaction_id"].duplicated().any()
    assert out["transaction_id"].head(10).tolist() == labelled["transaction_id"].tolist()
    base = labelled.set_index("transaction_id")
    for _, row in out.iterrows():
        tid, _, k = row["transaction_id"].partition("~")
        src = base.loc[tid]
        k_ = int(k or 0)
        assert k_ <= 2
        assert row["event_timestamp"] == src["event_timestamp"] - k_ * SHIFT
        assert row["request_ts_us"] == int(row["event_timestamp"].value // 1000)
        assert (row["user_id"], row["merchant_id"], row["txn_amount"], row["is_fraud"]) == (
            src["user_id"], src["merchant_id"], src["txn_amount"], src["is_fraud"])
    assert (out["transaction_id"].str.endswith("~2")).sum() == 5  # the rest: a sample
