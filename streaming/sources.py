"""Bytewax sources and dead-letter sinks besides the Kafka input (`streaming.kafka_input`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import (
    KafkaError,
    KafkaException,
    Message,
    Producer,
)

from scoring.kafka_conf import producer_conf
from streaming import metrics
from streaming.events import DeadLetter

log = logging.getLogger(__name__)

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



# --- dead letters out --------------------------------------------------------------------------


def _lost(d: DeadLetter, why: str) -> None:
    """Count and log a dead letter that could not be written (the flow goes on)."""
    metrics.DLQ_FAILED.labels(d.reason.split(":")[0]).inc()
    topic, partition, offset = d.origin or (None, None, None)
    log.error("dead letter not written (%s): key=%r topic=%s partition=%s offset=%s size=%d "
              "reason=%.200s", why, d.key, topic, partition, offset, len(d.original), d.reason)


class _JsonlPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")

    def write_batch(self, items: list[DeadLetter]) -> None:
        for d in items:
            try:
                self._f.write(d.to_json().decode() + "\n")
            except OSError as exc:
                _lost(d, str(exc))
                continue
            metrics.DLQ.labels(d.reason.split(":")[0]).inc()
        try:
            self._f.flush()
        except OSError as exc:
            log.error("dead-letter file not flushed: %s", exc)

    def close(self) -> None:
        self._f.close()


class JsonlDeadLetterSink(DynamicSink[DeadLetter]):
    """Dead letters appended to a JSON-lines file (backfills, which have no broker), one
    `DeadLetter.to_json` per line (bounded: 64 KiB of the original at most)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _JsonlPartition:
        return _JsonlPartition(self._path.with_suffix(f".{worker_index}.jsonl"))


# Errors after which the same record may well go through: retried until the budget is spent.
# Any other error (too large, invalid record ...) is the record's own: it is sent once more
# without its original, then given up.
_TRANSIENT = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN, KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT,
    KafkaError._QUEUE_FULL, KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC,
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.REQUEST_TIMED_OUT,
    KafkaError.UNKNOWN_PRODUCER_ID, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
})
_PENDING = object()  # no delivery report yet


class _KafkaDlqPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, bootstrap: str, topic: str, retry_s: float) -> None:
        attempt_ms = max(1000, int(min(retry_s, 10.0) * 1000))
        # Not idempotent: a long-lived producer must ride through broker restarts (see
        # `producer_conf`); a duplicated dead letter is harmless.
        self._conf = producer_conf(bootstrap, logger=log, enable_idempotence=False,
                                   delivery_timeout_ms=attempt_ms,
                                   request_timeout_ms=min(attempt_ms, 10_000))
        self._producer = Producer(self._conf)
        self._topic = topic
        self._retry_s = retry_s

    def write_batch(self, items: list[DeadLetter]) -> None:
        try:
            self._write(items)
        except Exception:  # never out of write_batch: the flow must go on
            log.exception("dead-letter sink failed on a batch of %d", len(items))
            for d in items:
                _lost(d, "sink error")

    def _write(self, items: list[DeadLetter]) -> None:
        deadline = time.monotonic() + self._retry_s
        pending = [(d, d.to_json(), False) for d in items]  # (letter, value, without original)
        backoff = 0.1
        while pending:
            retry, wait = [], False
            for (d, value, bare), error in zip(pending, self._attempt(pending, deadline),
                                               strict=True):
                if error is None:
                    metrics.DLQ.labels(d.reason.split(":")[0]).inc()
                elif error.code() not in _TRANSIENT and not error.retriable():
                    if bare:
                        _lost(d, str(error))
                    else:  # the record's own fault: once more, without the original
                        retry.append((d, d.to_json(max_original=0), True))
                elif time.monotonic() < deadline:
                    retry.append((d, value, bare))
                    wait = True
                else:
                    _lost(d, f"{error} after {self._retry_s:g} s of retries")
            pending = retry
            if wait:
                time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                backoff = min(backoff * 2, 5.0)

    def _attempt(self, pending: list[tuple[DeadLetter, bytes, bool]],
                 deadline: float) -> list[KafkaError | None]:
        """Produce each record and wait for its report; its error, or None once delivered."""
        reports: list[Any] = [_PENDING] * len(pending)

        def report(i: int, err: KafkaError | None, _msg: Message) -> None:
            reports[i] = err

        for i, (d, value, _) in enumerate(pending):
            while True:
                try:
                    self._producer.produce(self._topic, value=value, key=d.key,
                                           headers={"reason": d.reason[:200]},
                                           on_delivery=partial(report, i))
                    break
                except BufferError:  # local queue full: let it drain, within the budget
                    if time.monotonic() > deadline:
                        reports[i] = KafkaError(KafkaError._QUEUE_FULL)
                        break
                    self._producer.poll(0.1)
                except KafkaException as exc:  # e.g. larger than message.max.bytes
                    reports[i] = exc.args[0]
                    break
        self._producer.flush(max(1.0, deadline - time.monotonic()))
        # `is`, never `in`: a KafkaError compared with == to another object raises TypeError
        if any(r is _PENDING for r in reports):  # not reported in time: withdraw, count failed
            self._producer.purge()
            self._producer.poll(0)
        out = [KafkaError(KafkaError._MSG_TIMED_OUT) if r is _PENDING else r for r in reports]
        if any(e is not None and e.fatal() for e in out):
            self._producer = Producer(self._conf)
        return out

    def close(self) -> None:
        self._producer.flush(min(self._retry_s, 30.0))


class KafkaDeadLetterSink(DynamicSink[DeadLetter]):
    """Dead letters to a Kafka topic as bounded JSON (`DeadLetter.to_json`: reason, at most
    64 KiB of the original, its size and coordinates); key: the original key; header `reason`.

    Delivery: at-least-once while the broker takes the letters within `retry_s`
    (`STREAMING_DLQ_RETRY_S`, 30 s): `write_batch` returns, and the epoch and input offsets
    advance, once each letter is acknowledged, retrying with exponential backoff (0.1 s to 5 s)
    while errors are transient (broker down, timeouts).  A letter the broker refuses for
    itself (too large for the topic, invalid) is sent once more without its original.  A letter
    still not written then is counted in `fraud_stream_dlq_failed_total{reason}`, logged at
    ERROR with its key, reason, topic, partition and offset, and skipped: `write_batch` never
    raises, so a poison record or a DLQ that is down never stops or crash-loops the flow (it
    slows it by at most `retry_s` per batch with dead letters).
    """

    def __init__(self, bootstrap: str, topic: str, retry_s: float = 30.0) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._retry_s = retry_s

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaDlqPartition:
        return _KafkaDlqPartition(self._bootstrap, self._topic, self._retry_s)


def read_dead_letters(path_glob: Path) -> list[dict[str, Any]]:
    """All dead letters in JSON-lines files matching a glob (tests, inspection)."""
    out: list[dict[str, Any]] = []
    for p in sorted(path_glob.parent.glob(path_glob.name)):
        out.extend(json.loads(line) for line in p.read_text().splitlines() if line)
    return out
