"""The offline tier on Spark: point-in-time join and latest rows per key, as DuckDB computes them.

Why not Feast's contrib `SparkOfflineStore`: it accepts only `SparkSource`/`IcebergSource`
views (ours are `FileSource`s, shared with the DuckDB store), reads a directory source by
glob (not the history's current files), and its point-in-time SQL joins every entity row with
every feature row of its key within the ttl, then ranks them: O(rows per key^2) with the
velocity view's 30-day ttl, the cost our DuckDB ASOF store was written to avoid.

Here each view is one sort instead, and distributes: feature rows and entity rows of a view
are unioned, partitioned by join key and ordered by time (feature rows before entity rows at
the same instant, and among feature rows the newest created last); `last(feature row,
ignorenulls)` over that order is, for each entity row, the greatest feature row with
timestamp <= t.  It is then discarded when older than t - ttl.  Same rules as
`feature_repo.offline_store.asof_join`: ties on the event time go to the newest created
timestamp (a null one loses), a null value in the winning row stays null, ttl 0 never
expires, duplicate entity rows are kept, one output row per input row in input order.

Only the narrow entity columns (join keys, event time, row number) go to Spark; the result's
feature columns come back through Arrow and are cast to the parquet files' own types, so the
frame equals DuckDB's value for value.  Sources are read from exactly the files the caller
lists (`live_files`), never a directory glob.  The Spark session is started once per process
(`spark_session`) from `OFFLINE_SPARK_*` (feature_repo.offline_engines.config).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from feature_repo.offline_engines.config import get_settings
from feature_repo.offline_engines.plan import ViewJoin

logger = logging.getLogger(__name__)
TS = "event_timestamp"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@lru_cache(maxsize=1)
def spark_session() -> SparkSession:
    """The process's Spark session (started on first use; the JVM ends with the process)."""
    s = get_settings()
    if s.spark_master.startswith("local"):  # the driver on loopback, not the host's address
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (
        SparkSession.builder.appName("fraudstream-offline")
        .master(s.spark_master)
        .config("spark.driver.memory", s.spark_driver_memory)
        .config("spark.sql.shuffle.partitions", str(s.spark_shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.useLargeVarTypes", "false")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.legacy.parquet.nanosAsLong", "true")  # see micros_column
    )
    for key, value in s.spark_conf.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # py4j/pyspark raise plain exceptions when the JVM cannot start
        raise RuntimeError(
            f"OFFLINE_ENGINE=spark could not start Spark on {s.spark_master!r}: {exc}. Spark "
            "needs Java 17 or newer (`java` on PATH, or JAVA_HOME)") from exc
    spark.sparkContext.setLogLevel("ERROR")
    logger.info("spark session on %s (spark %s)", s.spark_master, spark.version)
    return spark


def micros(t: datetime) -> int:
    """Microseconds since the epoch, exactly (a naive time is taken as UTC)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - _EPOCH) // timedelta(microseconds=1)


def _read(files: Sequence[Path]) -> DataFrame:
    if not files:
        raise FileNotFoundError("no parquet files to read for this source")
    return spark_session().read.parquet(*[str(f) for f in files])


def micros_column(column: str, schema: pa.Schema) -> Column:
    """A timestamp column (tz-aware or naive UTC) as microseconds since the epoch.

    Spark reads nanosecond parquet timestamps as nanoseconds (`nanosAsLong`); they are
    truncated to microseconds, as DuckDB's cast to TIMESTAMPTZ does."""
    kind = schema.field(column).type if column in schema.names else None
    if isinstance(kind, pa.TimestampType) and kind.unit == "ns":
        return F.expr(f"`{column}` div 1000")
    return F.unix_micros(F.col(f"`{column}`").cast("timestamp"))


def _cast_to_files(table: pa.Table, files: Sequence[Path], columns: Sequence[str]) -> pa.Table:
    """Give `columns` of a collected table the type they have in the parquet files."""
    schema = pq.read_schema(files[0])
    for name in columns:
        source = name if name in schema.names else None
        if source is None:
            continue
        i = table.column_names.index(name)
        want = schema.field(source).type
        if table.schema.field(i).type != want:
            table = table.set_column(i, name, table.column(i).cast(want))
    return table


def asof_join(entities: pa.Table, views: list[ViewJoin]) -> list[pa.Table]:
    """For each view, its output feature columns for every entity row, in `entities`' order.

    `entities` holds the joined keys and `event_timestamp` (timestamp[us, UTC]); see the module
    docstring for the rules.
    """
    spark = spark_session()
    n = entities.num_rows
    narrow = entities.append_column("__row", pa.array(np.arange(n, dtype=np.int64)))
    ent = spark.createDataFrame(narrow.replace_schema_metadata(None))
    us = entities[TS].cast(pa.timestamp("us", "UTC")).cast(pa.int64())
    lo, hi = pc.min(us).as_py(), pc.max(us).as_py()
    return [_join_view(ent, v, n, lo, hi) for v in views]


def _join_view(ent: DataFrame, v: ViewJoin, n: int, lo: int | None, hi: int | None) -> pa.Table:
    ttl_us = v.ttl // timedelta(microseconds=1) if v.ttl else 0
    src, schema = _read(v.files), pq.read_schema(v.files[0])
    t = micros_column(v.timestamp_field, schema)
    keep = F.lit(True)
    for k in v.keys:
        keep = keep & F.col(f"`{k}`").isNotNull()
    if hi is not None:  # rows no entity row can use (as the DuckDB store's window)
        keep = keep & (t <= F.lit(hi))
        if ttl_us:
            keep = keep & (t >= F.lit((lo or 0) - ttl_us))
    fields = [F.col(f"`{f}`").alias(f"__f{j}") for j, f in enumerate(v.features)]
    created = (micros_column(v.created_field, schema) if v.created_field
               else F.lit(None).cast("long"))
    rows = src.where(keep).select(
        *[F.col(f"`{k}`").alias(ek) for k, ek in v.keys.items()],
        t.alias("__t"), F.lit(0).alias("__kind"), created.alias("__c"),
        F.struct(t.alias("__t"), *fields).alias("__v"), F.lit(None).cast("long").alias("__row"),
    )
    value_type = rows.schema["__v"].dataType
    asks = ent.select(
        *[F.col(f"`{ek}`") for ek in v.keys.values()],
        F.unix_micros(F.col(TS)).alias("__t"), F.lit(1).alias("__kind"),
        F.lit(None).cast("long").alias("__c"), F.lit(None).cast(value_type).alias("__v"),
        F.col("__row"),
    )
    order = Window.partitionBy(*[F.col(f"`{ek}`") for ek in v.keys.values()]).orderBy(
        "__t", "__kind", F.col("__c").asc_nulls_first()
    ).rowsBetween(Window.unboundedPreceding, Window.currentRow)
    found = rows.unionByName(asks).withColumn("__m", F.last("__v", ignorenulls=True).over(order))
    fresh = F.col("__m").isNotNull()
    if ttl_us:
        fresh = fresh & (F.col("__m.__t") >= F.col("__t") - F.lit(ttl_us))
    result = found.where(F.col("__kind") == 1).select(
        "__row",
        *[F.when(fresh, F.col(f"__m.__f{j}")).alias(f"__f{j}") for j in range(len(v.features))],
    )
    table = result.toArrow()
    if table.num_rows != n:
        raise RuntimeError(f"spark point-in-time join returned {table.num_rows} rows for {n}")
    table = table.take(pc.sort_indices(table["__row"])).drop_columns(["__row"])
    table = table.rename_columns(v.features)
    table = _cast_to_files(table, v.files, v.features)
    return table.rename_columns(v.names)


def latest_rows(
    files: Sequence[Path], keys: list[str], columns: list[str], timestamp_field: str,
    created_field: str | None, start: datetime, end: datetime, batch_rows: int,
) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """Each key's latest row with start <= event time <= end: `columns` + `__micros` (its event
    time in microseconds), in batches of `batch_rows`, as the DuckDB path of
    `feature_repo.materialization` yields them.

    Latest by (event time, created time; a null created time loses); rows with a null key are
    skipped.  The winners are collected to the driver once (one row per key).
    """
    src, schema = _read(files), pq.read_schema(files[0])
    t = micros_column(timestamp_field, schema)
    keep = (t >= F.lit(micros(start))) & (t <= F.lit(micros(end)))
    for k in keys:
        keep = keep & F.col(f"`{k}`").isNotNull()
    created = micros_column(created_field, schema).desc_nulls_last() if created_field else F.lit(0)
    rank = F.row_number().over(
        Window.partitionBy(*[F.col(f"`{k}`") for k in keys]).orderBy(t.desc(), created))
    winners = (src.where(keep)
               .select(*[F.col(f"`{c}`") for c in columns], t.alias("__micros"),
                       rank.alias("__rank"))
               .where(F.col("__rank") == 1).drop("__rank"))
    table = _cast_to_files(winners.toArrow(), files, columns)
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield batch, batch.column("__micros").to_numpy()
