"""Batch feature job: daily user and merchant profiles from the transaction log.

Each snapshot row has `event_timestamp` = a day's 00:00 UTC and uses only data strictly before
it: transactions of the 30 preceding days, and fraud labels whose `label_timestamp` is earlier
than the snapshot.  Snapshots run from the day after a user's (merchant's) first transaction to
the day after the log ends.  Output: `$FRAUD_DATA_DIR/features/{user,merchant}_profile.parquet`.

A user's profile also carries the card holder's home time zone from the customer records
(`$FRAUD_DATA_DIR/customers.parquet`; missing when there are none) and the user's usual time
of day: the circular mean of the UTC times of day of their transactions in the window, so the
request-time features can say how far a transaction lies from the user's own rhythm.

The job runs on the offline engine `OFFLINE_ENGINE` selects: DuckDB in this process (default)
or Spark (`feature_repo.offline_engines.spark.spark_session`).  Both run the same SQL
(`training.profile_sql`), which yields exact integers only: counts, sums of whole cents and of
their squares, fixed-point sums of each transaction's time-of-day sine and cosine, distinct
merchants, known frauds.  The floats (means, deviation, account age, usual hour) are computed
from them here, by the same numpy code for both engines, in chunks of `CHUNK_ROWS` rows of the
ordered result, so the two engines write identical files, bit for bit
(tests/integration/training/test_batch_features_engines.py).  Under Spark the aggregates are
collected to this process before they are written (the output is one file per table).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from feature_repo.config import apply_env_defaults, data_dir
from feature_repo.offline_engines import get_settings
from feature_repo.offline_engines.spark import micros_column, spark_session
from feature_repo.paths import customers_path, features_dir, labels_path, transactions_dir
from feature_repo.progress import progress, show_summaries
from training.profile_sql import (
    AMOUNT_SCALE,
    DAY_US,
    DUCKDB,
    HOUR_SCALE,
    LAST_DAY,
    SPARK,
    Dialect,
    profile_queries,
    views,
)

WINDOW_DAYS = 30
# Below this mean resultant length the hours of a window spread evenly round the clock and
# their circular mean is noise: the usual hour is missing instead.
MIN_RESULTANT = 1e-6
CHUNK_ROWS = 1 << 20  # rows finished at a time (the same cut for both engines)
ROW_GROUP_ROWS = 122_880  # DuckDB's own row group size, which the readers were tuned on
_NO_CUSTOMERS = ("SELECT CAST(NULL AS STRING) AS user_id, "
                 "CAST(NULL AS DOUBLE) AS home_utc_offset_hours LIMIT 0")
_TS = pa.timestamp("us", tz="UTC")
USER_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("event_timestamp", _TS), ("user_txn_count_30d", pa.int64()),
    ("user_amount_mean_30d", pa.float64()), ("user_amount_std_30d", pa.float64()),
    ("user_distinct_merchants_30d", pa.int64()), ("user_account_age_days", pa.float64()),
    ("user_utc_offset_hours", pa.float64()), ("user_usual_hour_30d", pa.float64()),
])
MERCHANT_SCHEMA = pa.schema([
    ("merchant_id", pa.string()), ("event_timestamp", _TS),
    ("merchant_txn_count_30d", pa.int64()), ("merchant_amount_mean_30d", pa.float64()),
    ("merchant_fraud_rate_30d", pa.float64()),
])


class _Engine(Protocol):
    dialect: Dialect

    def run(self, sql: str) -> None: ...
    def last_day(self) -> int | None: ...
    def batches(self, sql: str) -> Iterable[pa.RecordBatch]: ...
    def close(self) -> None: ...


class _DuckDB:
    """The log read by DuckDB in this process."""

    dialect = DUCKDB

    def __init__(self, root: Path) -> None:
        self.con = duckdb.connect()
        cust = customers_path(root)
        tx_glob = transactions_dir(root) / "*" / "*.parquet"
        self.con.execute(f"""
            SET TimeZone = 'UTC';
            CREATE TEMP VIEW tx_raw AS
              SELECT transaction_id, user_id, merchant_id, CAST(amount AS DOUBLE) AS amount,
                     epoch_us(event_timestamp::TIMESTAMPTZ) AS us
              FROM read_parquet('{tx_glob}', hive_partitioning = false);
            CREATE TEMP VIEW labels_raw AS
              SELECT transaction_id, is_fraud, epoch_us(label_timestamp::TIMESTAMPTZ) AS label_us
              FROM read_parquet('{labels_path(root)}');
            CREATE TEMP VIEW customers AS {
                f"SELECT user_id, home_utc_offset_hours FROM read_parquet('{cust}')"
                if cust.exists() else _NO_CUSTOMERS};
        """)

    def run(self, sql: str) -> None:
        self.con.execute(sql)

    def last_day(self) -> int | None:
        row = self.con.sql(LAST_DAY).fetchall()[0]
        return None if row[0] is None else int(row[0])

    def batches(self, sql: str) -> Iterable[pa.RecordBatch]:
        return self.con.sql(sql).to_arrow_reader()

    def close(self) -> None:
        self.con.close()


class _Spark:
    """The log read by Spark (`OFFLINE_SPARK_MASTER`); results come back through Arrow."""

    dialect = SPARK

    def __init__(self, root: Path) -> None:
        self.spark = spark_session()
        files = sorted(transactions_dir(root).glob("*/*.parquet"))
        if not files:
            raise FileNotFoundError(f"no transaction files under {transactions_dir(root)}")
        schema = pq.read_schema(files[0])
        self.spark.read.parquet(*map(str, files)).select(
            "transaction_id", "user_id", "merchant_id", F.col("amount").cast("double"),
            micros_column("event_timestamp", schema).alias("us"),
        ).createOrReplaceTempView("tx_raw")
        labels = labels_path(root)
        self.spark.read.parquet(str(labels)).select(
            "transaction_id", "is_fraud",
            micros_column("label_timestamp", pq.read_schema(labels)).alias("label_us"),
        ).createOrReplaceTempView("labels_raw")
        cust = customers_path(root)
        customers = (self.spark.read.parquet(str(cust)).select("user_id",
                                                               "home_utc_offset_hours")
                     if cust.exists() else self.spark.sql(_NO_CUSTOMERS))
        customers.createOrReplaceTempView("customers")

    def run(self, sql: str) -> None:
        self.spark.sql(sql)

    def last_day(self) -> int | None:
        row = self.spark.sql(LAST_DAY).first()
        return None if row is None or row[0] is None else int(row[0])

    def batches(self, sql: str) -> Iterable[pa.RecordBatch]:
        return self.spark.sql(sql).toArrow().to_batches()

    def close(self) -> None:  # the session itself lives on (spark_session)
        for view in ("tx", "labels", "tx_raw", "labels_raw", "customers"):
            self.spark.catalog.dropTempView(view)


def _chunks(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """The rows of `batches` cut into tables of exactly `rows` rows (the last one shorter),
    whatever batch sizes the engine returned."""
    pending: list[pa.RecordBatch] = []
    n = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - n, batch.num_rows)
            pending.append(batch.slice(0, take))
            n, batch = n + take, batch.slice(take)
            if n == rows:
                yield pa.Table.from_batches(pending).combine_chunks()
                pending, n = [], 0
    if n:
        yield pa.Table.from_batches(pending).combine_chunks()


def _ints(column: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(column, 0).to_numpy().astype(np.int64)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """Integers (BIGINT, DECIMAL(38,0)) as the nearest doubles, nulls as 0."""
    return pc.fill_null(pc.cast(column, pa.float64(), safe=False), 0.0).to_numpy()


def _snapshot(t: pa.Table) -> tuple[pa.Array, np.ndarray]:
    """Snapshot times, and the key's age at each in days (since its first transaction)."""
    us = _ints(t["day"]) * DAY_US
    return pa.array(us).cast(_TS), (us - _ints(t["first_us"])) / DAY_US


def _user_rows(t: pa.Table) -> pa.Table:
    c = _ints(t["c"])
    n, s = c.astype(np.float64), _floats(t["s"])  # s in cents
    hs, hc = _floats(t["hs"]) / HOUR_SCALE, _floats(t["hc"]) / HOUR_SCALE
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / AMOUNT_SCALE / n
        # sample deviation from the exact c * sum((x - mean)^2), in cents^2
        std = np.sqrt(_floats(t["c_sq_dev"]) / (n * (n - 1))) / AMOUNT_SCALE
        # circular mean of the times of day, none when they cancel out (no usual hour)
        hour = np.fmod(np.arctan2(hs, hc) * 12 / np.pi + 24, 24)
        has_hour = (c > 0) & (np.sqrt(hs * hs + hc * hc) > MIN_RESULTANT * n)
    ts, age = _snapshot(t)
    return pa.table([
        t["user_id"].cast(pa.string()), ts, pa.array(c), pa.array(mean, mask=c == 0),
        pa.array(std, mask=c <= 1), pa.array(_ints(t["distinct_merchants"])), pa.array(age),
        t["home_utc_offset_hours"].cast(pa.float64()), pa.array(hour, mask=~has_hour),
    ], schema=USER_SCHEMA)


def _merchant_rows(t: pa.Table) -> pa.Table:
    c = _ints(t["c"])
    n = c.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = _floats(t["s"]) / AMOUNT_SCALE / n
        fraud_rate = _floats(t["known_frauds"]) / n
    ts, _ = _snapshot(t)
    return pa.table([
        t["merchant_id"].cast(pa.string()), ts, pa.array(c), pa.array(mean, mask=c == 0),
        pa.array(fraud_rate, mask=c == 0),
    ], schema=MERCHANT_SCHEMA)


_FINISH = {"user_profile": (_user_rows, USER_SCHEMA),
           "merchant_profile": (_merchant_rows, MERCHANT_SCHEMA)}


def _write(batches: Iterable[pa.RecordBatch], name: str, out: Path) -> int:
    """Finish the aggregates of table `name` and write them to `out` (replaced whole)."""
    finish, schema = _FINISH[name]
    tmp, rows = out.with_name(f".{out.name}.tmp"), 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for chunk in _chunks(batches, CHUNK_ROWS):
            writer.write_table(finish(chunk), row_group_size=ROW_GROUP_ROWS)
            rows += chunk.num_rows
    os.replace(tmp, out)
    return rows


def build_profiles(root: Path | None = None) -> dict[str, int]:
    """Write both profile tables on the configured engine; return their row counts."""
    root = root or data_dir()
    out_dir = features_dir(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    # progress: the log's load, then each table (a bar on a terminal, one INFO line at the end)
    with progress("batch features", total=3, unit="steps") as bar:
        bar.step("load the log")
        engine: _Engine = _Spark(root) if get_settings().engine == "spark" else _DuckDB(root)
        try:
            for sql in views(engine.dialect):
                engine.run(sql)
            last_day = engine.last_day()
            if last_day is None:
                raise ValueError(f"no transactions under {transactions_dir(root)}")
            bar.update()
            queries = profile_queries(engine.dialect, last_day, WINDOW_DAYS)
            for name, sql in queries.items():
                bar.step(name)
                counts[name] = _write(engine.batches(sql), name, out_dir / f"{name}.parquet")
                bar.update()
        finally:
            engine.close()
        bar.note = f"({sum(counts.values()):,} snapshot rows)"
    return counts


def main(argv: list[str] | None = None) -> None:
    apply_env_defaults()
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    show_summaries()
    t0 = time.perf_counter()
    counts = build_profiles()
    print(
        f"batch features: {counts['user_profile']:,} user and {counts['merchant_profile']:,} "
        f"merchant daily snapshots in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
