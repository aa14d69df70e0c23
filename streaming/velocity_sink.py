"""Where velocity rows go: the online store (coalesced) and the offline history (parquet).

Delivery guarantee: at-least-once, idempotent by key.  Each micro-batch is converted to Arrow
once.  Online, the newest row of each user in the batch is written, and every write is
acknowledged before the sink's Bytewax snapshot returns, so before the snapshot that commits
the batch's input offsets: with a plain Redis online store as one pipelined round of
check-and-set script calls sent from a writer thread (`RedisOnlineWriter`: the bytes Feast's
RedisOnlineStore would write, `feature_repo.redis_wire`, and Feast's rule that a row replaces
the stored one only if its event timestamp is strictly newer, checked atomically per key in
Redis); with any other online store synchronously through Feast's `write_to_online_store`,
which keeps the same rule.  A replay therefore cannot roll a user back.  A failed online write
fails the worker before its snapshot commits; it resumes from the previous snapshot.
Offline rows are buffered and flushed to a new parquet file at each Bytewax snapshot, before the
snapshot commits; a crash between flush and commit replays events whose rows are rewritten with
identical values and timestamps, which the point-in-time join treats as one row.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from streaming import metrics

if TYPE_CHECKING:
    from feast import FeatureStore
    from redis.connection import Connection

    from feature_repo.redis_wire import RowEncoder

log = logging.getLogger(__name__)

VELOCITY_VIEW = "user_velocity_fv"
FLUSH_ROWS = 100_000
KEYS_PER_CALL = 100  # keys per script call: one call holds Redis ~1 ms (materialization's default)
WRITE_TIMEOUT_S = 5.0  # socket timeout of the online writer (at least the store's own)
WRITE_ATTEMPTS = 3
WRITES_QUEUED = 4  # micro-batches encoded ahead of the online writer thread (backpressure)
HISTORY_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("created_timestamp", pa.timestamp("us", tz="UTC")),
        ("recent_txn_ts", pa.list_(pa.int64())),
        ("recent_amounts", pa.list_(pa.float64())),
        ("recent_merchants", pa.list_(pa.string())),
        ("known_merchants", pa.list_(pa.string())),
        ("known_merchant_first_ts", pa.list_(pa.int64())),
    ]
)


@dataclass(frozen=True)
class VelocityRow:
    """One `user_velocity_fv` row (see feature_repo.velocity.UserVelocityState.row)."""

    user_id: str
    row: dict[str, Any]
    produced_at: float | None = None  # producer time of the event that caused it, epoch s


def history_table(rows: Iterable[VelocityRow]) -> pa.Table:
    """Rows as an Arrow table in the offline history schema (created = event timestamp)."""
    rows = list(rows)
    ts = pa.array([r.row["row_ts_us"] for r in rows], pa.timestamp("us", tz="UTC"))
    cols: dict[str, Any] = {
        "user_id": pa.array([r.user_id for r in rows], pa.string()),
        "event_timestamp": ts,
        "created_timestamp": ts,
    }
    for field in HISTORY_SCHEMA.names[3:]:
        cols[field] = pa.array([r.row[field] for r in rows], HISTORY_SCHEMA.field(field).type)
    return pa.table(cols, schema=HISTORY_SCHEMA)


def newest_per_user(rows: list[VelocityRow]) -> list[int]:
    """Position of each user's newest row in `rows` (a user's rows arrive in state order, so
    its last one), users in order of first appearance."""
    last: dict[str, int] = {}
    for i, r in enumerate(rows):
        last[r.user_id] = i
    return list(last.values())


def observe_written(produced_at: list[float | None]) -> None:
    """Metrics of one acknowledged online write of rows caused by events produced then."""
    now = time.time()
    for produced in produced_at:
        if produced is not None:
            metrics.FRESHNESS.observe(max(now - produced, 0.0))
    metrics.WRITE_BATCHES.inc()
    metrics.ROWS_WRITTEN.labels("online").inc(len(produced_at))


class OnlineWriter(Protocol):
    def write(self, rows: list[VelocityRow], table: pa.Table) -> None:
        """Write (or start writing) the newest of `rows` per user (`table` is
        `history_table(rows)`)."""

    def flush(self) -> None:
        """Return once everything written so far is acknowledged; raise if it failed."""

    def close(self) -> None: ...


class FeastOnlineWriter:
    """Through `FeatureStore.write_to_online_store`: any online store Feast supports.
    Synchronous: a batch is acknowledged when `write` returns."""

    def __init__(self, store: FeatureStore) -> None:
        self._store = store

    def write(self, rows: list[VelocityRow], table: pa.Table) -> None:
        newest = newest_per_user(rows)
        # Feast needs the source's created_timestamp column too (it orders same-time rows).
        self._store.write_to_online_store(VELOCITY_VIEW, df=table.take(newest).to_pandas())
        observe_written([rows[i].produced_at for i in newest])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RedisOnlineWriter:
    """Pipelined check-and-set script calls, one round per micro-batch (plain Redis).

    The hashes are byte for byte those Feast's RedisOnlineStore writes (`redis_wire`), and the
    script is the materialization engine's (`write_script`): a row replaces the stored one only
    if its event timestamp is strictly newer, checked and written atomically per key.

    `write` encodes the batch and queues it; a background thread sends it and reads the
    replies, so the dataflow goes on while Redis works.  `flush` (at every Bytewax snapshot,
    before the snapshot commits) waits until every queued batch is acknowledged.  Connection
    errors and timeouts are retried (the script makes a repeated write a no-op); any other
    error, or retries exhausted, is raised by the next `write` or `flush`, and nothing queued
    after it is sent.
    """

    def __init__(self, client: redis.Redis, encoder: RowEncoder, script: bytes,
                 header: list[bytes], keys_per_call: int = KEYS_PER_CALL,
                 queued: int = WRITES_QUEUED) -> None:
        self._client = client
        self._encoder = encoder
        self._script = script
        self._header = header
        self._keys_per_call = keys_per_call
        self._conn: Connection | None = None
        self._error: BaseException | None = None
        self._jobs: queue.Queue[tuple[list[bytes], list[float | None]] | None] = queue.Queue(
            maxsize=queued)
        self._thread = threading.Thread(target=self._loop, name="online-writer", daemon=True)
        self._thread.start()

    def write(self, rows: list[VelocityRow], table: pa.Table) -> None:
        self._raise()
        newest = newest_per_user(rows)
        micros = np.fromiter((rows[i].row["row_ts_us"] for i in newest), np.int64, len(newest))
        encoded = self._encoder.encode(table.take(newest), micros)
        calls = list(encoded.script_calls(self._script, self._header, self._keys_per_call))
        self._jobs.put((calls, [rows[i].produced_at for i in newest]))

    def flush(self) -> None:
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._jobs.put(None)
            self._thread.join()
            if self._conn is not None:
                self._client.connection_pool.release(self._conn)
                self._conn = None
            self._client.close()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError("online write failed") from self._error

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:
                    calls, produced_at = job
                    self._send(calls)
                    observe_written(produced_at)
            except BaseException as e:  # noqa: BLE001 - raised in the dataflow's thread
                self._error = e
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _send(self, calls: list[bytes]) -> None:
        for attempt in range(WRITE_ATTEMPTS):
            if self._conn is None:
                self._conn = self._client.connection_pool.get_connection()
            conn = self._conn
            try:
                conn.send_packed_command(calls)
                for _ in calls:
                    conn.read_response()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()  # replies may be unread: reconnect for the next attempt
                if attempt + 1 == WRITE_ATTEMPTS:
                    raise
                log.warning("online write failed, retrying", exc_info=True)
                time.sleep(0.2 * 2**attempt)
            except BaseException:
                conn.disconnect()
                raise


def online_writer(repo_path: Path) -> OnlineWriter:
    """The writer for the repo's online store: `RedisOnlineWriter` for a plain Redis (as the
    materialization engine's fast path requires), else `FeastOnlineWriter`."""
    from feast import FeatureStore
    from feast.infra.online_stores.helpers import compute_versioned_name
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig, RedisType

    from feature_repo.materialization import redis_client, write_script
    from feature_repo.redis_wire import RowEncoder

    store = FeatureStore(repo_path=str(repo_path))
    config = store.config
    online = config.online_store
    if not (isinstance(online, RedisOnlineStoreConfig) and online.redis_type == RedisType.redis
            and config.entity_key_serialization_version >= 3):
        return FeastOnlineWriter(store)
    view = store.get_feature_view(VELOCITY_VIEW)
    encoder = RowEncoder(
        project=config.project,
        view_name=compute_versioned_name(view, config.registry.enable_online_feature_view_versioning),
        join_keys=[(f.name, f.dtype.to_value_type().value) for f in view.entity_columns],
        features=[(f.name, f.dtype.to_value_type().value) for f in view.features],
        key_serialization_version=config.entity_key_serialization_version,
    )
    header = encoder.header(ttl=online.key_ttl_seconds or 0, force=bool(online.skip_dedup))
    return RedisOnlineWriter(redis_client(online.connection_string, WRITE_TIMEOUT_S), encoder,
                             write_script(len(view.features)), header)


class HistoryWriter:
    """Appends rows to the offline history directory, one parquet file per flush (atomic)."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, tables: list[pa.Table]) -> None:
        """One file of `tables` (each in the history schema, see `history_table`)."""
        table = pa.concat_tables(tables) if tables else None
        if table is None or not table.num_rows:
            return
        name = f"{self.prefix}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.directory / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.directory / name)  # readers never see a half-written file
        metrics.ROWS_WRITTEN.labels("offline").inc(table.num_rows)


class _VelocityPartition(StatefulSinkPartition[VelocityRow, None]):
    def __init__(self, online: OnlineWriter | None, history: HistoryWriter | None) -> None:
        self._online = online
        self._history = history
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def write_batch(self, items: list[VelocityRow]) -> None:
        if not items or (self._online is None and self._history is None):
            return
        table = history_table(items)  # one conversion for both stores
        if self._online is not None:
            self._online.write(items, table)
        if self._history is not None:
            self._buffer.append(table)
            self._buffered += len(items)
            if self._buffered >= FLUSH_ROWS:  # bounded memory between snapshots
                self._flush()

    def snapshot(self) -> None:
        if self._online is not None:
            self._online.flush()
        self._flush()
        return None

    def close(self) -> None:
        self._flush()
        if self._online is not None:
            self._online.close()

    def _flush(self) -> None:
        if self._history is not None and self._buffer:
            self._history.write(self._buffer)
            self._buffer, self._buffered = [], 0


class VelocitySink(FixedPartitionedSink[VelocityRow, None]):
    """Sink of (user_id, VelocityRow): online store and/or offline history, per partition."""

    def __init__(
        self,
        repo_path: Path | None,
        history_dir: Path | None,
        partitions: int = 1,
        prefix: str = "stream",
    ) -> None:
        self._repo_path = repo_path
        self._history_dir = history_dir
        self._parts = [f"p{i}" for i in range(partitions)]
        self._prefix = prefix

    def list_parts(self) -> list[str]:
        return self._parts

    def part_fn(self, item_key: str) -> int:
        import zlib

        return zlib.crc32(item_key.encode())

    def build_part(
        self, step_id: str, for_part: str, resume_state: None
    ) -> _VelocityPartition:
        online = online_writer(self._repo_path) if self._repo_path else None
        history = (
            HistoryWriter(self._history_dir, f"{self._prefix}-{for_part}")
            if self._history_dir
            else None
        )
        return _VelocityPartition(online, history)


def rows_frame(rows: Iterable[VelocityRow]) -> pd.DataFrame:
    """Rows as a DataFrame in the offline history schema (for tests and inspection)."""
    return history_table(rows).to_pandas()
