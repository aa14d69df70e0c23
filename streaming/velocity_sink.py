"""Where velocity rows go: the online store (coalesced) and the offline history (a Delta table).

Delivery guarantee: at-least-once, idempotent by key.  Each micro-batch is converted to Arrow
once.  Online, the newest row of each user in the batch is written, and every write is
acknowledged before the sink's Bytewax snapshot returns, so before the snapshot that commits
the batch's input offsets: with a Redis (node or cluster) online store through
`feature_repo.redis_store.writer` (`RedisOnlineWriter`: the bytes Feast's RedisOnlineStore
would write, pipelined from a writer thread, and Feast's rule that a row replaces the stored
one only if its event timestamp is strictly newer, checked atomically per key in Redis); with
any other online store synchronously through Feast's `write_to_online_store`, which keeps the
same rule.  A replay therefore cannot roll a user back.  A failed online write fails the
worker before its snapshot commits; it resumes from the previous snapshot.
Offline rows go to the history table (`feature_repo.history`) through a thread of the
partition's own (`BackgroundHistory`): it writes them to a staged parquet file as they come (a
row group per `STAGE_ROWS` rows) and adds that file to the table in one Delta commit at each
Bytewax snapshot, before the snapshot commits (and every `FLUSH_ROWS` rows in between); a
commit is atomic, so readers see all of a flush or none of it.  So the snapshot, which Bytewax
takes on the worker thread while no event is processed, waits only for the last rows' write
and the commit, not for encoding the epoch's rows.  A crash between
that commit and the snapshot's replays events whose rows are appended again with identical
values and timestamps, which the point-in-time join and materialization treat as one row.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from feast import FeatureStore

from feature_repo import history
from feature_repo.redis_store.client import is_supported
from feature_repo.redis_store.encode import RowEncoder
from feature_repo.redis_store.writer import ScriptWriter, view_writer
from streaming import metrics

VELOCITY_VIEW = "user_velocity_fv"
FLUSH_ROWS = 100_000  # offline rows committed at the latest after this many (bounded files)
STAGE_ROWS = 4_096  # offline rows handed to the history thread at a time (a row group each)
STAGES_QUEUED = 8  # hand-overs pending before `add` waits for the history thread (backpressure)
WRITE_TIMEOUT_S = 5.0  # socket timeout of the online writer (at least the store's own)
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

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as its three values (Bytewax pickles every row it routes to the sink
        partition of another process): a third of the cost of a dataclass's default."""
        return (VelocityRow, (self.user_id, self.row, self.produced_at))


_ROW_TS = pa.timestamp("us", tz="UTC")
_LIST_FIELDS = tuple(HISTORY_SCHEMA.names[3:])  # the row's list columns, in schema order
_LIST_TYPES = tuple(HISTORY_SCHEMA.field(f).type for f in _LIST_FIELDS)
_ROW_VALUES = itemgetter("row_ts_us", *_LIST_FIELDS)  # a row dict -> its values, one C call


def history_table(rows: Iterable[VelocityRow]) -> pa.Table:
    """Rows as an Arrow table in the offline history schema (created = event timestamp).

    Column-wise: each row's values are taken in one `itemgetter` call and transposed, then
    each column is converted once (no dict lookup per row and column)."""
    rows = list(rows)
    if not rows:
        return HISTORY_SCHEMA.empty_table()
    ts_us, *lists = zip(*map(_ROW_VALUES, [r.row for r in rows]), strict=True)
    ts = pa.array(ts_us, _ROW_TS)
    arrays = [pa.array([r.user_id for r in rows], pa.string()), ts, ts]
    arrays += [pa.array(values, kind) for values, kind in zip(lists, _LIST_TYPES, strict=True)]
    return pa.Table.from_arrays(arrays, schema=HISTORY_SCHEMA)


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
    """A Redis online store (node or cluster), through `feature_repo.redis_store.writer.ScriptWriter`.

    `write` encodes the newest row per user and queues it; the writer's thread sends it while
    the dataflow goes on.  `flush` (at every Bytewax snapshot, before the snapshot commits)
    waits until every queued batch is acknowledged.  Connection errors and timeouts are
    retried; any other error, or retries exhausted, is raised by the next `write` or `flush`,
    and nothing queued after it is written.
    """

    def __init__(self, encoder: RowEncoder, writer: ScriptWriter) -> None:
        self._encoder = encoder
        self._writer = writer

    def write(self, rows: list[VelocityRow], table: pa.Table) -> None:
        newest = newest_per_user(rows)
        batch = table.take(newest)
        micros = batch.column("event_timestamp").combine_chunks().cast(pa.int64()).to_numpy()
        encoded = self._encoder.encode(batch, micros)
        produced_at = [rows[i].produced_at for i in newest]
        self._writer.send(encoded, on_written=partial(observe_written, produced_at))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        try:
            self._writer.flush()
        finally:
            self._writer.close()


def online_writer(repo_path: Path) -> OnlineWriter:
    """The writer for the repo's online store: `RedisOnlineWriter` for a Redis node or cluster (as the
    materialization engine's fast path requires), else `FeastOnlineWriter`."""
    store = FeatureStore(repo_path=str(repo_path))
    config = store.config
    if not (is_supported(config.online_store) and config.entity_key_serialization_version >= 3):
        return FeastOnlineWriter(store)
    encoder = RowEncoder.for_view(store.get_feature_view(VELOCITY_VIEW), config)
    writer = view_writer(config.online_store, encoder, socket_timeout_s=WRITE_TIMEOUT_S,
                         queued=WRITES_QUEUED)
    return RedisOnlineWriter(encoder, writer)


class HistoryWriter:
    """Appends rows of one origin (`stream`, `backfill` ...) to the offline history table at
    `directory` (`feature_repo.history`): one Delta commit per `write`, atomic, and safe while
    other partitions and processes append to the same table."""

    def __init__(self, directory: Path, origin: str) -> None:
        self.directory = directory
        self.origin = origin

    def write(self, tables: list[pa.Table]) -> None:
        """One commit of `tables` (each in the history schema, see `history_table`)."""
        table = pa.concat_tables(tables) if tables else None
        if table is None or not table.num_rows:
            return
        history.append(self.directory, table, self.origin)
        metrics.ROWS_WRITTEN.labels("offline").inc(table.num_rows)


class BackgroundHistory:
    """A sink partition's offline rows, written by a thread of their own to a staged file of the
    history table (`feature_repo.history.StagedFile`) and committed on request.

    `add` hands rows over (`STAGE_ROWS` at a time; it waits when `STAGES_QUEUED` hand-overs
    are pending) and returns; `start_commit` queues the commit of every row added so far and
    `wait` returns once everything queued is done, raising the first failure of any write or
    commit.  After a failure nothing more is written or committed (a file whose write failed
    is deleted, every later task fails too): the worker fails and resumes from its previous
    snapshot, as with a failed online write.  One thread, so writes and commits happen in the
    order they were asked for.
    """

    def __init__(self, writer: HistoryWriter) -> None:
        self._writer = writer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="history")
        self._pending: list[Future[None]] = []
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._uncommitted = 0
        self._file: history.StagedFile | None = None  # the history thread's only
        self._failed: BaseException | None = None  # the history thread's first failure

    def add(self, table: pa.Table) -> None:
        self._buffer.append(table)
        self._buffered += table.num_rows
        self._uncommitted += table.num_rows
        if self._buffered >= STAGE_ROWS:
            self._hand_over()
        if self._uncommitted >= FLUSH_ROWS:  # bounded staged files between snapshots
            self.start_commit()
        while self._pending and (self._pending[0].done() or len(self._pending) > STAGES_QUEUED):
            self._pending.pop(0).result()  # a failed write fails the worker now

    def start_commit(self) -> None:
        if self._buffer:
            self._hand_over()
        if self._uncommitted:
            self._pending.append(self._pool.submit(self._commit))
            self._uncommitted = 0

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        futures.wait(pending)  # all of them, so none is still running when this raises
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.start_commit()
            self.wait()
        finally:
            self._pool.shutdown()

    def _hand_over(self) -> None:
        tables, self._buffer, self._buffered = self._buffer, [], 0
        self._pending.append(self._pool.submit(self._stage, tables))

    def _stage(self, tables: list[pa.Table]) -> None:
        self._unless_failed()
        try:
            if self._file is None:
                self._file = history.StagedFile(self._writer.directory, HISTORY_SCHEMA,
                                                self._writer.origin)
            self._file.write(pa.concat_tables(tables))
        except BaseException as exc:
            self._fail(exc)
            raise

    def _commit(self) -> None:
        self._unless_failed()
        staged, self._file = self._file, None
        if staged is None:
            return
        try:
            history.commit_staged(self._writer.directory, [staged.close()])
        except BaseException as exc:
            # the file is kept: a commit that failed after landing may have added it, and a
            # file the table does not hold is deleted by the next vacuum
            self._fail(exc)
            raise
        metrics.ROWS_WRITTEN.labels("offline").inc(staged.rows)

    def _unless_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError("an earlier offline history write failed") from self._failed

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        staged, self._file = self._file, None
        if staged is not None:
            staged.discard()


class _VelocityPartition(StatefulSinkPartition[VelocityRow, None]):
    def __init__(self, online: OnlineWriter | None, history: HistoryWriter | None) -> None:
        self._online = online
        self._history = BackgroundHistory(history) if history is not None else None

    def write_batch(self, items: list[VelocityRow]) -> None:
        if not items or (self._online is None and self._history is None):
            return
        table = history_table(items)  # one conversion for both stores
        if self._online is not None:
            self._online.write(items, table)
        if self._history is not None:
            self._history.add(table)

    def snapshot(self) -> None:
        if self._history is not None:
            self._history.start_commit()  # runs while the online writes are awaited
        if self._online is not None:
            self._online.flush()
        if self._history is not None:
            self._history.wait()
        return None

    def close(self) -> None:
        try:
            if self._history is not None:
                self._history.close()
        finally:
            if self._online is not None:
                self._online.close()


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
        return zlib.crc32(item_key.encode())

    def build_part(
        self, step_id: str, for_part: str, resume_state: None
    ) -> _VelocityPartition:
        online = online_writer(self._repo_path) if self._repo_path else None
        history = (
            HistoryWriter(self._history_dir, self._prefix)  # the rows' origin in the table
            if self._history_dir
            else None
        )
        return _VelocityPartition(online, history)

