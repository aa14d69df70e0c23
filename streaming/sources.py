"""Bytewax sources and dead-letter sinks besides Kafka's own connectors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer

from streaming import metrics
from streaming.events import DeadLetter
from streaming.kafka_conf import producer_conf

_COLUMNS = ["transaction_id", "user_id", "merchant_id", "amount", "currency", "channel",
            "event_timestamp"]


class _LogPartition(StatefulSourcePartition[dict[str, Any], tuple[int, int]]):
    def __init__(self, files: list[Path], batch_size: int, resume: tuple[int, int] | None):
        self._files = files
        self._batch_size = batch_size
        self._pos = resume or (0, 0)
        self._iter = self._batches()

    def _batches(self) -> Iterator[list[dict[str, Any]]]:
        file_idx, offset = self._pos
        for i in range(file_idx, len(self._files)):
            table = pq.read_table(self._files[i], columns=_COLUMNS)
            start = offset if i == file_idx else 0
            for lo in range(start, table.num_rows, self._batch_size):
                batch = table.slice(lo, self._batch_size).to_pylist()
                for rec in batch:
                    rec["schema_version"] = 1
                self._pos = (i, lo + len(batch))
                yield batch
            self._pos = (i + 1, 0)

    def next_batch(self) -> list[dict[str, Any]]:
        try:
            return next(self._iter)
        except StopIteration:
            raise StopIteration from None

    def snapshot(self) -> tuple[int, int]:
        return self._pos


class ParquetLogSource(FixedPartitionedSource[dict[str, Any], tuple[int, int]]):
    """The day-partitioned transaction log, replayed in event-time order (one partition).

    Resumable: the snapshot is (file index, row offset), so a backfill with recovery restarts
    where its last snapshot left off.
    """

    def __init__(self, directory: Path, batch_size: int = 2000) -> None:
        self._files = sorted(directory.glob("*/*.parquet"))
        self._batch_size = batch_size

    def list_parts(self) -> list[str]:
        return ["log"]

    def build_part(
        self, step_id: str, for_part: str, resume_state: tuple[int, int] | None
    ) -> _LogPartition:
        return _LogPartition(self._files, self._batch_size, resume_state)


class _JsonlPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")

    def write_batch(self, items: list[DeadLetter]) -> None:
        for d in items:
            self._f.write(d.to_json().decode() + "\n")
            metrics.DLQ.labels(d.reason.split(":")[0]).inc()
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class JsonlDeadLetterSink(DynamicSink[DeadLetter]):
    """Dead letters appended to a JSON-lines file (backfills, which have no broker)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _JsonlPartition:
        return _JsonlPartition(self._path.with_suffix(f".{worker_index}.jsonl"))


class _KafkaDlqPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, bootstrap: str, topic: str) -> None:
        self._producer = Producer(producer_conf(bootstrap))
        self._topic = topic

    def write_batch(self, items: list[DeadLetter]) -> None:
        for d in items:
            self._producer.produce(self._topic, value=d.to_json(), key=d.key,
                                   headers={"reason": d.reason[:200]})
            metrics.DLQ.labels(d.reason.split(":")[0]).inc()
        # At-least-once: the batch is acknowledged before the epoch (and offsets) advance.
        remaining = self._producer.flush(30)
        if remaining:
            raise RuntimeError(f"{remaining} dead letters not acknowledged by the broker")

    def close(self) -> None:
        self._producer.flush(30)


class KafkaDeadLetterSink(DynamicSink[DeadLetter]):
    """Dead letters to a Kafka topic as `{"reason", "original"}` JSON (at-least-once)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._bootstrap = bootstrap
        self._topic = topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaDlqPartition:
        return _KafkaDlqPartition(self._bootstrap, self._topic)


def read_dead_letters(path_glob: Path) -> list[dict[str, Any]]:
    """All dead letters in JSON-lines files matching a glob (tests, inspection)."""
    out: list[dict[str, Any]] = []
    for p in sorted(path_glob.parent.glob(path_glob.name)):
        out.extend(json.loads(line) for line in p.read_text().splitlines() if line)
    return out
