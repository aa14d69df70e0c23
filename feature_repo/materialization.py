"""`feast materialize` into Redis at bulk speed: a batch engine registered in feature_store.yaml.

Feast's local engine pulls every row of the window into pandas, deduplicates it, turns each row
into protobuf objects in Python and hands them all to `online_write_batch` at once (for a
million keys: ~10 GB and ~10k rows/s).  This engine overrides only `materialize`; for a feature
view whose batch source is local parquet and whose online store is a plain Redis it

1. selects each entity key's latest row in the window with one streamed DuckDB query over the
   parquet files: `arg_max` of the row's position by (event timestamp, created timestamp; a
   null created timestamp loses), `start <= event_timestamp <= end` in UTC, null keys
   skipped; a semi join then reads just those rows, `read_batch_rows` at a time;
2. encodes keys, `_ts:<view>` and the features column by column into exactly the bytes Feast's
   RedisOnlineStore writes (`feature_repo.redis_wire`), and
3. writes them from a background thread with a Lua script that keeps Feast's rule atomically
   per key: a row is written only if the stored `_ts:<view>` is absent, zero or strictly
   older (so a stream that wrote a newer row while materialization ran keeps it).

Anything else (other stores or sources, field mappings, transformations, aggregations, vector
indexes, views that also write offline, Redis Cluster/Sentinel) goes to the stock local engine
unchanged.  As with the stock engine, `FeatureStore.materialize` records the materialized
interval afterwards, so `feast materialize-incremental` is unaffected.

Delivery: at-least-once and idempotent by key.  A re-run rewrites nothing newer than what is
stored; a failed run leaves each key either untouched or fully written (one HSET per key),
never half-written.  Rows of a key with equal event and created timestamps are a tie that both
engines break arbitrarily.
"""

from __future__ import annotations

import logging
import queue
import string
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import redis
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
from feast.infra.online_stores.helpers import compute_versioned_name
from feast.infra.online_stores.redis import RedisOnlineStore, RedisType
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import RepoConfig
from feast.stream_feature_view import StreamFeatureView
from pydantic import Field as ConfigField

from feature_repo import redis_wire
from feature_repo.online_store import client_kwargs
from feature_repo.parquet_files import live_files

logger = logging.getLogger(__name__)
T = TypeVar("T")
_DONE: Any = object()

ENGINE_TYPE = "feature_repo.materialization.FastRedisMaterializationEngine"

# Check-and-set of a batch of keys in one script call.  KEYS: the Redis keys.  ARGV: the
# `_ts:<view>` field, the number of features n, the key TTL in seconds (0: none), "1" to skip
# the timestamp check (Feast's `skip_dedup`), the n feature field names, then per key its
# serialized Timestamp followed by its n serialized values.  Returns how many keys it wrote.
# Timestamps are compared as (seconds, nanos); a stored zero counts as absent, as in Feast.
_SCRIPT = string.Template("""
local function varint(s, i)
  local v, mul, k, b = 0, 1, 0, 0
  repeat
    b = string.byte(s, i + k); k = k + 1
    v = v + (b % 128) * mul; mul = mul * 128
  until b < 128
  if k == 10 then
    local c = 0; mul = 1
    for j = 0, 8 do c = c + (127 - string.byte(s, i + j) % 128) * mul; mul = mul * 128 end
    v = -(c + 1)
  end
  return v, i + k
end
local function stamp(s)
  local sec, nanos, i = 0, 0, 1
  while i <= #s do
    local tag = string.byte(s, i)
    local v
    v, i = varint(s, i + 1)
    if tag == 8 then sec = v elseif tag == 16 then nanos = v end
  end
  return sec, nanos
end
local call, tsf, ttl, force = redis.call, ARGV[1], tonumber(ARGV[3]), ARGV[4] == '1'
local width, first, written = $n + 1, 5 + $n, 0
for i = 1, #KEYS do
  local key, b = KEYS[i], first + (i - 1) * width
  local new = ARGV[b]
  local ok = force
  if not ok then
    local old = call('HGET', key, tsf)
    if not old then
      ok = true
    else
      local os, on = stamp(old)
      if os == 0 and on == 0 then
        ok = true
      else
        local ns, nn = stamp(new)
        ok = ns > os or (ns == os and nn > on)
      end
    end
  end
  if ok then
$writes
    if ttl > 0 then call('EXPIRE', key, ttl) end
    written = written + 1
  end
end
return written
""")
_FIELDS_PER_HSET = 80  # a Lua call takes at most ~250 arguments


def write_script(n_features: int) -> bytes:
    """The check-and-set script for views of `n_features` features.

    The HSET argument lists are spelled out (field name `ARGV[4 + j]`, value `ARGV[b + j]`),
    which saves building a table per key; views wider than 80 features take several HSETs
    (still one atomic step per key).
    """
    pairs = [f"ARGV[{4 + j}], ARGV[b + {j}]" for j in range(1, n_features + 1)]
    chunks = [pairs[i:i + _FIELDS_PER_HSET] for i in range(0, n_features, _FIELDS_PER_HSET)]
    writes = "\n".join(
        f"    call('HSET', key, {'tsf, new, ' if i == 0 else ''}{', '.join(chunk)})"
        for i, chunk in enumerate(chunks)
    )
    return _SCRIPT.substitute(n=n_features, writes=writes).encode()


class FastRedisMaterializationEngineConfig(LocalComputeEngineConfig):
    """`batch_engine:` settings; everything but `type` is optional."""

    type: Literal["feature_repo.materialization.FastRedisMaterializationEngine"] = ENGINE_TYPE  # type: ignore[assignment]
    read_batch_rows: int = ConfigField(50_000, gt=0)
    """Rows read from DuckDB and encoded at a time (bounds the engine's own memory)."""
    keys_per_script: int = ConfigField(100, gt=0)
    """Keys per script call.  A call holds Redis for its duration (about 1 ms per 100 keys on
    an idle server), so this bounds the latency it adds for other clients, e.g. serving."""
    max_in_flight: int = ConfigField(16, gt=0)
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
    join_keys: list[tuple[str, int]]  # (name, ValueType value), in the view's entity order
    features: list[tuple[str, int]]
    timestamp_field: str
    created_field: str | None
    view_name: str


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
            isinstance(self.online_store, RedisOnlineStore)
            and getattr(store_config, "redis_type", None) == RedisType.redis
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
            join_keys=[(f.name, f.dtype.to_value_type().value) for f in fv.entity_columns],
            features=[(f.name, f.dtype.to_value_type().value) for f in fv.features],
            timestamp_field=source.timestamp_field,
            created_field=source.created_timestamp_column or None,
            view_name=compute_versioned_name(
                fv, config.registry.enable_online_feature_view_versioning
            ),
        )

    def run(self, plan: _Plan, task: MaterializationTask) -> int:
        """Materialize one feature view; returns the number of keys written."""
        t0 = time.monotonic()
        store_config = self.repo_config.online_store
        encoder = redis_wire.RowEncoder(
            project=self.repo_config.project,
            view_name=plan.view_name,
            join_keys=plan.join_keys,
            features=plan.features,
            key_serialization_version=self.repo_config.entity_key_serialization_version,
        )
        writer = ScriptWriter(
            redis_client(store_config.connection_string, self.options.socket_timeout_s),
            write_script(len(plan.features)),
            encoder.header(ttl=store_config.key_ttl_seconds or 0,
                           force=bool(getattr(store_config, "skip_dedup", False))),
            keys_per_script=self.options.keys_per_script,
            max_in_flight=self.options.max_in_flight,
        )
        watch = _Stopwatch()
        rows = 0
        with writer:
            for batch, micros in watch.timed("read", self.latest_rows(plan, task)):
                with watch.stage("encode"):
                    encoded = encoder.encode(batch, micros)
                with watch.stage("write"):
                    writer.send(encoded)
                rows += batch.num_rows
            with watch.stage("write"):
                written = writer.finish()
        logger.info("%s: %d of %d keys written (%d kept a stored row at least as new) in "
                    "%.1fs (%s)", plan.view.name, written, rows, rows - written,
                    time.monotonic() - t0, watch)
        return written

    def latest_rows(self, plan: _Plan,
                    task: MaterializationTask) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
        """The winning row of every key in the window, in batches of `read_batch_rows`.

        Yields (join keys + features, event times in microseconds since the epoch).  One DuckDB
        query: an aggregate picks each key's winning row (its file and row number), then a
        semi join reads those rows back from the files; the result is streamed.
        """
        q = _quote
        keys = ", ".join(q(k) for k, _ in plan.join_keys)
        columns = ", ".join(q(c) for c in dict.fromkeys(
            [k for k, _ in plan.join_keys] + [f for f, _ in plan.features]))
        ts = f"{q(plan.timestamp_field)}::TIMESTAMPTZ"
        order = f"epoch_us({ts})"
        if plan.created_field:
            # (event, created) as one HUGEINT: event in the high 64 bits, created + 2^63 in the
            # low ones (0 when null, so a null created loses as in the stock engine's sort).
            created = f"epoch_us({q(plan.created_field)}::TIMESTAMPTZ)::HUGEINT"
            order = (f"{order}::HUGEINT * 18446744073709551616"
                     f" + coalesce({created} + 9223372036854775808, 0)")
        not_null = " AND ".join(f"{q(k)} IS NOT NULL" for k, _ in plan.join_keys)
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


def redis_client(connection_string: str, socket_timeout_s: float) -> redis.Redis:
    """A client for Feast's `host:port,key=value,...` connection string (plain Redis only)."""
    params = client_kwargs(connection_string)
    params["socket_timeout"] = max(float(params.get("socket_timeout") or 0), socket_timeout_s)
    return redis.Redis(**params)


class ScriptWriter:
    """Sends encoded batches as pipelined calls of the write script, from a background thread.

    Batches arrive already packed as Redis protocol (`redis_wire`), so the thread only moves
    bytes: it keeps up to `max_in_flight` calls awaiting their reply on one connection, while
    the caller reads and encodes the next batch (at most `queued` batches wait in between).
    The first error (connection, script) is raised by the next `send` or by `finish`.
    """

    def __init__(self, client: redis.Redis, script: bytes, header: Sequence[bytes], *,
                 keys_per_script: int, max_in_flight: int, queued: int = 2) -> None:
        self.client = client
        self.script = script
        self.header = list(header)
        self.keys_per_script = keys_per_script
        self.max_in_flight = max_in_flight
        self.batches: queue.Queue[redis_wire.EncodedRows | None] = queue.Queue(maxsize=queued)
        self.thread = threading.Thread(target=self._loop, name="redis-writer", daemon=True)
        self.written = 0
        self.error: BaseException | None = None

    def __enter__(self) -> ScriptWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.thread.is_alive():
            self.batches.put(None)
            self.thread.join()
        self.client.close()

    def send(self, encoded: redis_wire.EncodedRows) -> None:
        self._raise()
        self.batches.put(encoded)

    def finish(self) -> int:
        """Waits until every batch is written; returns how many keys the script wrote."""
        self.batches.put(None)
        self.thread.join()
        self._raise()
        return self.written

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        conn = self.client.connection_pool.get_connection()
        pending = 0
        try:
            while (encoded := self.batches.get()) is not None:
                for call in encoded.script_calls(self.script, self.header, self.keys_per_script):
                    conn.send_packed_command([call], check_health=False)
                    pending += 1
                    if pending >= self.max_in_flight:
                        self.written += int(conn.read_response())
                        pending -= 1
            for _ in range(pending):
                self.written += int(conn.read_response())
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self.error = e
            conn.disconnect()  # replies may be unread: the connection is not reusable
            while self.batches.get() is not None:  # unblock the producer until it stops
                pass
        finally:
            self.client.connection_pool.release(conn)
