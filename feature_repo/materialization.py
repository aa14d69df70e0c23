"""`feast materialize` into Redis at bulk speed: a batch engine registered in feature_store.yaml.

Feast's local engine pulls every row of the window into pandas, deduplicates it, turns each row
into protobuf objects in Python and hands them all to `online_write_batch` at once (memory
grows with the window; figures in docs/benchmarks.md).  This engine overrides only
`materialize`; for a feature view whose batch source is local parquet and whose online store
is a Redis node or cluster (`redis_store.client.is_supported`) it

1. selects each entity key's latest row in the window with one streamed DuckDB query over the
   parquet files: `arg_max` of the row's position by (event timestamp, created timestamp; a
   null created timestamp loses), `start <= event_timestamp <= end` in UTC, null keys
   skipped; a semi join then reads just those rows, `read_batch_rows` at a time;
2. encodes keys, `_ts:<view>` and the features column by column into exactly the bytes Feast's
   RedisOnlineStore writes (`feature_repo.redis_store.encode`), and
3. writes them with `feature_repo.redis_store.writer`: from a background thread, with a Lua
   script that keeps Feast's rule atomically per key: a row is written only if the stored
   `_ts:<view>` is absent, zero or strictly older (so a stream that wrote a newer row while
   materialization ran keeps it).

Anything else (other stores or sources, field mappings, transformations, aggregations, vector
indexes, views that also write offline, Redis Sentinel) goes to the stock local engine
unchanged.  As with the stock engine, `FeatureStore.materialize` records the materialized
interval afterwards, so `feast materialize-incremental` is unaffected.

Delivery: at-least-once and idempotent by key.  A re-run rewrites nothing newer than what is
stored; connection errors and timeouts are retried per batch (`redis_store.writer`); a failed
run leaves each key either untouched or fully written (one HSET per key), never half-written.  Rows of a key with equal event and created timestamps are a tie that both
engines break arbitrarily.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
from feast import FeatureView, FileSource
from feast.data_format import ParquetFormat
from feast.infra.common.materialization_job import (
    MaterializationJob,
    MaterializationJobStatus,
    MaterializationTask,
)
from feast.infra.compute_engines.local.compute import (
    LocalComputeEngine,
    LocalComputeEngineConfig,
)
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import RepoConfig
from feast.stream_feature_view import StreamFeatureView
from pydantic import Field as ConfigField

from feature_repo.history import live_files
from feature_repo.offline_engines import get_settings as engine_settings
from feature_repo.offline_engines import spark
from feature_repo.progress import progress
from feature_repo.redis_store.client import is_supported
from feature_repo.redis_store.encode import RowEncoder
from feature_repo.redis_store.writer import KEYS_PER_CALL, MAX_IN_FLIGHT, view_writer

logger = logging.getLogger(__name__)
T = TypeVar("T")
_DONE: Any = object()

ENGINE_TYPE = "feature_repo.materialization.FastRedisMaterializationEngine"


class FastRedisMaterializationEngineConfig(LocalComputeEngineConfig):
    """`batch_engine:` settings; everything but `type` is optional."""

    type: Literal["feature_repo.materialization.FastRedisMaterializationEngine"] = ENGINE_TYPE  # type: ignore[assignment]
    read_batch_rows: int = ConfigField(50_000, gt=0)
    """Rows read from DuckDB and encoded at a time (bounds the engine's own memory)."""
    keys_per_script: int = ConfigField(KEYS_PER_CALL, gt=0)
    """Keys per script call.  A call holds Redis for its duration, so this bounds the latency
    it adds for other clients, e.g. serving."""
    max_in_flight: int = ConfigField(MAX_IN_FLIGHT, gt=0)
    """Script calls sent ahead of their reply (pipelining keeps Redis busy)."""
    duckdb_memory_limit: str = "512MB"
    duckdb_threads: int | None = None
    """DuckDB's threads for the read (default: one per core)."""
    socket_timeout_s: float = ConfigField(60.0, gt=0)
    """Read timeout of the writer's connection: a call may outlast a serving timeout."""


@dataclass(frozen=True)
class _Plan:
    """What the fast path needs to know about one feature view."""

    view: FeatureView
    files: list[Path]
    encoder: RowEncoder  # join keys and features with their value types, the stored name
    timestamp_field: str
    created_field: str | None


class FastRedisMaterializationEngine(LocalComputeEngine):
    """Feast's local engine with a bulk path for parquet -> Redis (see module docstring)."""

    def __init__(self, *, repo_config: RepoConfig, offline_store: Any, online_store: Any,
                 **options: Any) -> None:
        self.options = FastRedisMaterializationEngineConfig(**options)
        super().__init__(repo_config=repo_config, offline_store=offline_store,
                         online_store=online_store, backend=self.options.backend)

    def materialize(
        self,
        registry: BaseRegistry,
        tasks: MaterializationTask | list[MaterializationTask],
        **kwargs: Any,
    ) -> list[MaterializationJob]:
        jobs: list[MaterializationJob] = []
        for task in [tasks] if isinstance(tasks, MaterializationTask) else tasks:
            plan = self.plan(task)
            if plan is None:
                jobs.extend(super().materialize(registry, task, **kwargs))
                continue
            job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
            try:
                self.run(plan, task)
            except Exception as e:  # noqa: BLE001 - reported through the job, as the stock engine does
                jobs.append(LocalMaterializationJob(job_id, MaterializationJobStatus.ERROR, e))
            else:
                jobs.append(LocalMaterializationJob(job_id, MaterializationJobStatus.SUCCEEDED))
        return jobs

    def plan(self, task: MaterializationTask) -> _Plan | None:
        """The fast-path plan for a task, or None when the stock engine must handle it."""
        fv, config = task.feature_view, self.repo_config
        store_config = config.online_store
        source = fv.batch_source
        if not (
            is_supported(store_config)
            and task.only_latest
            and type(fv) in (FeatureView, StreamFeatureView)
            and fv.online
            and not getattr(fv, "offline", False)
            and not getattr(fv, "aggregations", None)
            and not getattr(fv, "feature_transformation", None)
            and not getattr(fv, "udf", None)
            and fv.entity_columns
            and not any(getattr(f, "vector_index", False) for f in fv.features)
            and isinstance(source, FileSource)
            and not source.field_mapping
            and (isinstance(source.file_format, ParquetFormat)
                 or (source.file_format is None and source.path.endswith(".parquet")))
        ):
            return None
        path = Path(source.path.removeprefix("file://"))
        if "://" in source.path.removeprefix("file://") or not path.exists():
            return None
        files = [p for p in live_files(path) if p.is_file()] if path.is_dir() else [path]
        if not files or not fv.features or config.entity_key_serialization_version < 3:
            return None
        return _Plan(
            view=fv,
            files=files,
            encoder=RowEncoder.for_view(fv, config),
            timestamp_field=source.timestamp_field,
            created_field=source.created_timestamp_column or None,
        )

    def run(self, plan: _Plan, task: MaterializationTask) -> int:
        """Materialize one feature view; returns the number of keys written."""
        t0 = time.monotonic()
        encoder = plan.encoder
        writer = view_writer(
            self.repo_config.online_store, encoder,
            socket_timeout_s=self.options.socket_timeout_s,
            keys_per_call=self.options.keys_per_script,
            max_in_flight=self.options.max_in_flight,
        )
        watch = _Stopwatch()
        rows = 0
        # a bar of the rows read on a terminal; the one INFO line at the end says the rest
        with writer, progress(f"materialize {plan.view.name}", unit="keys",
                              logger=logger) as bar:
            for batch, micros in watch.timed("read", self.latest_rows(plan, task)):
                with watch.stage("encode"):
                    encoded = encoder.encode(batch, micros)
                with watch.stage("write"):
                    writer.send(encoded)
                rows += batch.num_rows
                bar.update(batch.num_rows)
            with watch.stage("write"):
                written = writer.flush()
            bar.note = (f"({written:,} written, {rows - written:,} kept a stored row at least as "
                        f"new; {time.monotonic() - t0:.1f}s with set-up: {watch})")
        return written

    def latest_rows(self, plan: _Plan,
                    task: MaterializationTask) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
        """The winning row of every key in the window, in batches of `read_batch_rows`.

        Yields (join keys + features, event times in microseconds since the epoch).  One DuckDB
        query: an aggregate picks each key's winning row (its file and row number), then a
        semi join reads those rows back from the files; the result is streamed.
        """
        q = _quote
        join_keys = [k for k, _ in plan.encoder.join_keys]
        keys = ", ".join(q(k) for k in join_keys)
        names = list(dict.fromkeys(join_keys + [f for f, _ in plan.encoder.features]))
        if engine_settings().engine == "spark":  # OFFLINE_ENGINE: the same rows, from Spark
            yield from spark.latest_rows(plan.files, join_keys, names, plan.timestamp_field,
                                         plan.created_field, task.start_time, task.end_time,
                                         self.options.read_batch_rows)
            return
        columns = ", ".join(q(c) for c in names)
        ts = f"{q(plan.timestamp_field)}::TIMESTAMPTZ"
        order = f"epoch_us({ts})"
        if plan.created_field:
            # (event, created) as one HUGEINT: event in the high 64 bits, created + 2^63 in the
            # low ones (0 when null, so a null created loses as in the stock engine's sort).
            created = f"epoch_us({q(plan.created_field)}::TIMESTAMPTZ)::HUGEINT"
            order = (f"{order}::HUGEINT * 18446744073709551616"
                     f" + coalesce({created} + 9223372036854775808, 0)")
        not_null = " AND ".join(f"{q(k)} IS NOT NULL" for k in join_keys)
        position = "(file_index::BIGINT << 40 | file_row_number)"
        source = "read_parquet($files, file_row_number = true)"
        sql = (
            f"WITH winners AS (SELECT arg_max({position}, {order}) AS position FROM {source}"
            f" WHERE {ts} >= $start AND {ts} <= $end AND {not_null} GROUP BY {keys})"
            f" SELECT {columns}, epoch_us({ts}) AS __micros FROM {source}"
            f" SEMI JOIN winners ON {position} = winners.position"
        )
        config: dict[str, Any] = {
            "memory_limit": self.options.duckdb_memory_limit,
            "preserve_insertion_order": False,
            "temp_directory": tempfile.gettempdir(),
        }
        if self.options.duckdb_threads:
            config["threads"] = self.options.duckdb_threads
        with duckdb.connect(config=config) as con:
            con.execute("SET TimeZone = 'UTC'")
            params = {"files": [str(p) for p in plan.files],
                      "start": task.start_time, "end": task.end_time}
            for batch in con.sql(sql, params=params).to_arrow_reader(self.options.read_batch_rows):
                yield batch, batch.column("__micros").to_numpy()


class _Stopwatch:
    """Wall seconds the engine's thread spends per stage (waiting included), for the log."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start

    def timed(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """`items`, with the time taken to produce each one counted under `name`."""
        iterator = iter(items)
        while True:
            with self.stage(name):
                item = next(iterator, _DONE)
            if item is _DONE:
                return
            yield item

    def __str__(self) -> str:
        return ", ".join(f"{name} {sec:.1f}s" for name, sec in self.seconds.items())


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'

