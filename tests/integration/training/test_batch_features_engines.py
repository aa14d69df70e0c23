"""`training.batch_features` writes the same profile files on DuckDB and on Spark, bit for bit.

Both engines run on the same logs: a simulated one (120 users, 45 days: the window slides,
labels arrive late, customer records) and a hand-made one with the edges of the arithmetic
(times of day on the quadrant boundaries and 1 us either side, times that cancel round the
clock, sub-cent and negative amounts, a single transaction, labels at the snapshot instant,
no customer records).  Every column must be equal, floats compared by their bits.

The time-of-day terms (a polynomial in SQL, rounded to 2^-48) are also checked against libm.
"""

from __future__ import annotations

import math
import shutil
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from feature_repo.paths import features_dir
from tests.fixtures.engines import offline_engine
from training import batch_features
from training.batch_features import build_profiles
from training.profile_sql import DAY_US, DUCKDB, HOUR_SCALE, views
from training.simulate import SimConfig, customers, simulate, write

US = pd.Timedelta(microseconds=1)
D = pd.Timestamp("2026-03-31", tz="UTC")
H = pd.Timedelta(hours=1)


def _simulated_log(root: Path) -> None:
    cfg = SimConfig(users=120, days=45, seed=5, end=date(2026, 6, 1))
    tx, labels = simulate(cfg)
    write(tx, labels, root, customers(cfg))


def _edge_log(root: Path) -> None:
    day = D - pd.Timedelta(days=1)
    events = [  # (user, merchant, time, amount, fraud, label time)
        ("ua", "mx", D - pd.Timedelta(days=30), 2.0, 1, D - US),  # window start, label known
        ("ua", "my", D - US, 0.125, 1, D),  # a sub-cent tie; label at the snapshot instant
        ("ua", "mx", day + 6 * H - US, 1234.565, 0, D),  # quadrant edges, 1 us either side
        ("ua", "mz", day + 6 * H, -5.25, 0, D),
        ("ua", "mx", day + 6 * H + US, 0.001, 0, D),
        ("ua", "my", day + 12 * H, 99999.99, 1, D + H),
        ("ua", "mx", day + 18 * H - US, 19.99, 0, D),
        ("ua", "mx", day + 18 * H, 0.1, 0, D),
        ("ub", "mx", day, 10.0, 0, D),  # 00:00 and 12:00, 06:00 and 18:00: they cancel
        ("ub", "my", day + 12 * H, 10.0, 0, D),
        ("ub", "mx", day + 6 * H, 10.0, 0, D),
        ("ub", "my", day + 18 * H, 10.0, 0, D),
        ("uc", "mz", D + pd.Timedelta(days=1) - US, 7.77, 1, D),  # one transaction
    ]
    ts = pd.to_datetime([e[2] for e in events], utc=True).astype("datetime64[us, UTC]")
    tx = pd.DataFrame({
        "transaction_id": [f"t{i}" for i in range(len(events))],
        "user_id": [e[0] for e in events], "merchant_id": [e[1] for e in events],
        "amount": [e[3] for e in events], "currency": "EUR", "channel": "online",
        "event_timestamp": ts,
    }).sort_values("event_timestamp", ignore_index=True)
    labels = pd.DataFrame({
        "transaction_id": [f"t{i}" for i in range(len(events))],
        "is_fraud": np.array([e[4] for e in events], dtype="int8"),
        "label_timestamp": pd.to_datetime([e[5] for e in events], utc=True).astype(
            "datetime64[us, UTC]"),
    })
    write(tx, labels, root)


def _bits(column: pa.ChunkedArray) -> tuple[list[bool], list[Any]]:
    """Null mask and values; a float's value is its bit pattern (-0.0 differs from 0.0)."""
    nulls = column.is_null().to_pylist()
    if pa.types.is_floating(column.type):
        values = pc.fill_null(column, 0.0).to_numpy().view(np.uint64).tolist()
    else:
        values = column.to_pylist()
    return nulls, values


@pytest.mark.slow
@pytest.mark.parametrize("log", [_simulated_log, _edge_log], ids=["simulated", "edges"])
def test_both_engines_write_identical_profiles(tmp_path: Path, log: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    log(tmp_path)
    sessions: list[int] = []
    real_session = batch_features.spark_session

    def spy() -> Any:
        sessions.append(1)
        return real_session()

    monkeypatch.setattr(batch_features, "spark_session", spy)
    tables = {}
    for engine in ("duckdb", "spark"):
        with offline_engine(engine):
            counts = build_profiles(tmp_path)
        assert bool(sessions) == (engine == "spark")  # Spark ran only when selected
        tables[engine] = {name: pq.read_table(features_dir(tmp_path) / f"{name}.parquet")
                          for name in counts}
        shutil.rmtree(features_dir(tmp_path))
    for name, duck in tables["duckdb"].items():
        spark = tables["spark"][name]
        assert spark.schema == duck.schema
        assert spark.num_rows == duck.num_rows > 5
        for column in duck.column_names:
            assert _bits(spark[column]) == _bits(duck[column]), (name, column)
    user = tables["duckdb"]["user_profile"].to_pandas()
    for column in ("user_amount_std_30d", "user_usual_hour_30d"):
        assert user[column].notna().sum() > 0, column
    if log is _edge_log:
        ub = user[user["user_id"] == "ub"]
        assert ub["user_txn_count_30d"].max() == 4 and ub["user_usual_hour_30d"].isna().all()
        ua = user[(user["user_id"] == "ua") & (user["event_timestamp"] == D)].iloc[0]
        assert ua["user_txn_count_30d"] == 8 and not pd.isna(ua["user_usual_hour_30d"])
        cents = [200, 13, 123457, -525, 0, 9999999, 1999, 10]  # rounded half up to the cent
        assert ua["user_amount_mean_30d"] == sum(cents) / 100 / 8


def test_time_of_day_terms_match_libm() -> None:
    """The SQL sine and cosine of a time of day, rounded to 2^-48, are libm's to within that
    rounding (quadrant boundaries and 1 us either side, and random instants)."""
    quadrant = DAY_US // 4
    edges = [k * quadrant + e for k in range(4) for e in (-1, 0, 1) if 0 <= k * quadrant + e]
    rng = np.random.default_rng(4)
    of_day = np.array(edges + [DAY_US - 1] + rng.integers(0, DAY_US, 5000).tolist())
    base = 20_000 * DAY_US  # a day in 2024
    con = duckdb.connect()
    n = len(of_day)
    raw = pa.table({"transaction_id": of_day.astype(str), "user_id": ["u"] * n,
                    "merchant_id": ["m"] * n, "amount": [1.0] * n, "us": base + of_day})
    con.register("tx_raw_arrow", raw)
    con.execute("CREATE VIEW tx_raw AS SELECT * FROM tx_raw_arrow")
    con.execute("CREATE VIEW labels_raw AS SELECT 'x' AS transaction_id, 0 AS is_fraud, "
                "0::BIGINT AS label_us")
    for sql in views(DUCKDB):
        con.execute(sql)
    got = con.sql("SELECT us, hs, hc FROM tx ORDER BY us").fetchall()
    worst = 0.0
    for us, hs, hc in got:
        angle = (us % DAY_US) * 2 * math.pi / DAY_US
        worst = max(worst, abs(hs / HOUR_SCALE - math.sin(angle)),
                    abs(hc / HOUR_SCALE - math.cos(angle)))
    assert len(got) == len(of_day)
    assert worst <= 0.5 / HOUR_SCALE + 1e-15
