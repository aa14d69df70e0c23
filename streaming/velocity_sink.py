"""Where velocity rows go: Feast's online store (coalesced) and the offline history (parquet).

Delivery guarantee: at-least-once, idempotent by key.  Online writes go through Feast's public
`write_to_online_store`, one row per user per micro-batch (the newest state wins; Feast's Redis
store ignores a row that is not newer than the stored one, so a replay cannot roll a user back).
Offline rows are buffered and flushed to a new parquet file at each Bytewax snapshot, before the
snapshot commits; a crash between flush and commit replays events whose rows are rewritten with
identical values and timestamps, which the point-in-time join treats as one row.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from streaming import metrics

log = logging.getLogger(__name__)

VELOCITY_VIEW = "user_velocity_fv"
FLUSH_ROWS = 100_000
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


class OnlineWriter(Protocol):
    def write(self, rows: list[VelocityRow]) -> None: ...


class FeastOnlineWriter:
    """Writes the newest row per user through `FeatureStore.write_to_online_store`."""

    def __init__(self, repo_path: Path) -> None:
        from feast import FeatureStore

        self._store = FeatureStore(repo_path=str(repo_path))

    def write(self, rows: list[VelocityRow]) -> None:
        newest: dict[str, VelocityRow] = {}
        for r in rows:
            newest[r.user_id] = r  # rows of one user arrive in state order: last is newest
        # Feast needs the source's created_timestamp column too (it orders same-time rows).
        df = history_table(newest.values()).to_pandas()
        self._store.write_to_online_store(VELOCITY_VIEW, df=df)
        now = time.time()
        for r in newest.values():
            if r.produced_at is not None:
                metrics.FRESHNESS.observe(max(now - r.produced_at, 0.0))
        metrics.WRITE_BATCHES.inc()
        metrics.ROWS_WRITTEN.labels("online").inc(len(newest))


class HistoryWriter:
    """Appends rows to the offline history directory, one parquet file per flush (atomic)."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, rows: list[VelocityRow]) -> None:
        if not rows:
            return
        name = f"{self.prefix}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.directory / f".{name}.tmp"
        pq.write_table(history_table(rows), tmp)
        os.replace(tmp, self.directory / name)  # readers never see a half-written file
        metrics.ROWS_WRITTEN.labels("offline").inc(len(rows))


class _VelocityPartition(StatefulSinkPartition[VelocityRow, None]):
    def __init__(self, online: OnlineWriter | None, history: HistoryWriter | None) -> None:
        self._online = online
        self._history = history
        self._buffer: list[VelocityRow] = []

    def write_batch(self, items: list[VelocityRow]) -> None:
        if self._online is not None and items:
            self._online.write(items)
        if self._history is not None:
            self._buffer.extend(items)
            if len(self._buffer) >= FLUSH_ROWS:  # bounded memory between snapshots
                self._flush()

    def snapshot(self) -> None:
        self._flush()
        return None

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._history is not None and self._buffer:
            self._history.write(self._buffer)
            self._buffer = []


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
        online = FeastOnlineWriter(self._repo_path) if self._repo_path else None
        history = (
            HistoryWriter(self._history_dir, f"{self._prefix}-{for_part}")
            if self._history_dir
            else None
        )
        return _VelocityPartition(online, history)


def rows_frame(rows: Iterable[VelocityRow]) -> pd.DataFrame:
    """Rows as a DataFrame in the offline history schema (for tests and inspection)."""
    return history_table(rows).to_pandas()
