"""The live flow's Kafka input: Bytewax's `KafkaSource` semantics, plus it notices a lost log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import fields
from typing import Any

from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from scoring.kafka_conf import admin_conf, consumer_conf
from streaming import metrics

log = logging.getLogger(__name__)

KafkaMessage = KafkaSourceMessage[bytes | None, bytes | None]
CHECK_TIMEOUT_S = 2.0  # of one log check (topic id, end offset) and of a blocking offset query


class _KafkaPartition(StatefulSourcePartition[KafkaMessage, int]):
    """One partition of `KafkaInput`: the snapshot is the offset of the next record to read
    (`OFFSET_BEGINNING`, -2, before the first), as in Bytewax's `KafkaSource`."""

    def __init__(self, consumer: Consumer, admin: AdminClient, tp: TopicPartition,
                 resume: int | None, batch_size: int, reset: str, check_every_s: float) -> None:
        self._consumer, self._admin, self._tp = consumer, admin, tp
        self._batch_size, self._reset_to, self._check_every_s = batch_size, reset, check_every_s
        self._eof = False
        self._topic_id: str | None = None
        self._check: tuple[Future[Any], Future[Any], int] | None = None  # (id, end, asked at)
        self._next_check = time.monotonic()  # at once: learns the topic id
        self._offset = OFFSET_BEGINNING if resume is None else resume
        if self._offset >= 0:
            try:
                low, high = consumer.get_watermark_offsets(tp, CHECK_TIMEOUT_S, cached=False)
            except KafkaException as exc:
                log.warning("partition %d: resume offset %d not checked against the log (%s); "
                            "the running check will", tp.partition, self._offset, exc)
            else:
                if self._offset > high and not self._holds(self._offset - 1):
                    self._offset = self._reset_offset(
                        f"resume offset {self._offset} lies past the log's end ({high})", low, high)
        consumer.assign([TopicPartition(tp.topic, tp.partition, self._offset)])

    def next_batch(self) -> list[KafkaMessage]:
        if self._eof:
            raise StopIteration
        try:
            msgs = self._consumer.consume(self._batch_size, 0.001)
        except KafkaException as exc:  # never crash the worker: count, log, try again
            self._error(exc.args[0] if exc.args else None)
            msgs = []
        batch = []
        for msg in msgs:
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._eof = True  # emit this batch, stop at the next call
                    break
                self._error(error)
                continue
            batch.append(_source_message(msg))
        if batch:
            self._offset = (batch[-1].offset or 0) + 1
        if self._check is not None or time.monotonic() >= self._next_check:
            self._check_log()
        return batch

    def _error(self, error: KafkaError | None) -> None:
        code = error.name() if isinstance(error, KafkaError) else "unknown"
        metrics.SOURCE_ERRORS.labels(code).inc()
        log.warning("partition %d: consume error %s (at offset %d)", self._tp.partition, error,
                    self._offset)

    def _check_log(self) -> None:
        """Without blocking: ask for the topic's id and the partition's end, and once both
        answered, reset the offset if the topic was recreated or the log ends before it."""
        if self._check is None:
            topic, part = self._tp.topic, self._tp.partition
            try:
                described = self._admin.describe_topics(
                    TopicCollection([topic]), request_timeout=CHECK_TIMEOUT_S)[topic]
                ends = self._admin.list_offsets({TopicPartition(topic, part): OffsetSpec.latest()},
                                                request_timeout=CHECK_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a failed check is retried, never raised
                log.debug("partition %d: log check not sent: %s", part, exc)
                self._next_check = time.monotonic() + self._check_every_s
                return
            # the offset read up to when asking: the answer (the log's end at some moment
            # after this) is compared with it, never with an offset consumed since
            self._check = (described, next(iter(ends.values())), self._offset)
            return
        described, end, asked_at = self._check
        if not (described.done() and end.done()):
            return
        self._check = None
        self._next_check = time.monotonic() + self._check_every_s
        try:
            topic_id, high = str(described.result().topic_id), int(end.result().offset)
        except Exception as exc:  # noqa: BLE001 - broker unreachable, timed out: next time
            log.debug("partition %d: log check failed: %s", self._tp.partition, exc)
            return
        if self._topic_id is None:
            self._topic_id = topic_id
        if topic_id != self._topic_id:
            why = f"topic {self._tp.topic} was recreated (id {self._topic_id} -> {topic_id})"
        elif asked_at > high and not self._holds(asked_at - 1):
            why = f"offset {asked_at} lies past the log's end ({high})"
        else:
            return
        self._topic_id = topic_id
        try:
            low, high = self._consumer.get_watermark_offsets(self._tp, CHECK_TIMEOUT_S,
                                                             cached=False)
        except KafkaException:
            low, high = OFFSET_BEGINNING, OFFSET_END  # resolved by the consumer
        self._offset = self._reset_offset(why, low, high)
        self._consumer.assign([TopicPartition(self._tp.topic, self._tp.partition, self._offset)])

    def _holds(self, offset: int) -> bool:
        """Whether the log still serves the record at `offset`, one this partition has read,
        before an end offset below it is believed: Tansu answers a partition's end as the
        first offset of its last record batch + 1 (1 after one batch of 750 records), while a
        log that really ended before `offset` cannot serve it (the fetch then waits up to
        `CHECK_TIMEOUT_S`).  The consumer is re-assigned at the current offset afterwards."""
        topic, part = self._tp.topic, self._tp.partition
        self._consumer.assign([TopicPartition(topic, part, offset)])
        try:
            msgs = self._consumer.consume(1, CHECK_TIMEOUT_S)
        except KafkaException:
            msgs = []
        finally:
            self._consumer.assign([TopicPartition(topic, part, self._offset)])
        return any(m.error() is None and m.offset() == offset for m in msgs)

    def _reset_offset(self, why: str, low: int, high: int) -> int:
        new = low if self._reset_to == "earliest" else high
        metrics.OFFSET_RESETS.labels(str(self._tp.partition)).inc()
        log.warning("partition %d: %s: the log was lost or replaced; resuming at the %s "
                    "offset %d (STREAMING_OFFSET_RESET=%s)", self._tp.partition, why,
                    self._reset_to, new, self._reset_to)
        return new

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.close()


_new = object.__new__
# KafkaSourceMessage's fields, in order: `_source_message` fills them without `__init__`.
_FIELDS = ("key", "value", "topic", "headers", "latency", "offset", "partition", "timestamp")
if tuple(f.name for f in fields(KafkaSourceMessage)) != _FIELDS:  # a Bytewax upgrade changed them
    raise ImportError(f"KafkaSourceMessage's fields are not {_FIELDS}: update _source_message")


def _source_message(msg: Message) -> KafkaMessage:
    """The Bytewax message of a record, as `KafkaSourceMessage(key=..., ...)` builds it.

    Its fields are set in its `__dict__` directly: the frozen dataclass's generated
    `__init__` sets each of the eight with `object.__setattr__`, a microsecond per record
    (docs/benchmarks.md, issue 20); the object is the same (equal, frozen)."""
    m: KafkaMessage = _new(KafkaSourceMessage)
    d = m.__dict__
    d["key"] = msg.key()
    d["value"] = msg.value()
    d["topic"] = msg.topic()
    d["headers"] = msg.headers() or []
    d["latency"] = msg.latency()
    d["offset"] = msg.offset()
    d["partition"] = msg.partition()
    d["timestamp"] = msg.timestamp()
    return m


class KafkaInput(FixedPartitionedSource[KafkaMessage, int]):
    """A Kafka topic as Bytewax input, one input partition per Kafka partition, that notices
    a lost log (drop-in for Bytewax's `KafkaSource`: same partition keys "{i}-{topic}", same
    snapshots, the offset to read next, so existing recovery directories resume).

    Delivery: with recovery, offsets are snapshotted with the state; a restart resumes from
    them (at-least-once input, duplicates removed downstream by `transaction_id`).

    Lost log: a broker that lost its log (Tansu's memory storage after a restart, a topic
    deleted and recreated) keeps the consumer fetching at offsets the new log reaches only
    much later, and Tansu does not answer OFFSET_OUT_OF_RANGE.  So each partition checks,
    when built from a resume offset and then every `check_every_s` while running (without
    blocking the flow), whether the topic's id changed or its offset lies past the log's end
    (believed only once the log no longer serves the last record read: Tansu under-reports
    the end, see `_KafkaPartition._holds`); then it logs a WARNING, counts
    `fraud_stream_offset_resets_total{partition}` and resumes by `offset_reset`
    (`STREAMING_OFFSET_RESET`): "earliest" (default) re-reads the new log from its start
    (events already applied are ignored as duplicates), "latest" skips to its end.
    librdkafka applies the same policy (`auto.offset.reset`) where a broker does answer
    OFFSET_OUT_OF_RANGE.  Records of the new log read at the old offsets before the check
    noticed are read again after the reset: nothing is skipped.  Consume errors other than
    the end of a partition are logged and counted (`fraud_stream_source_errors_total`),
    never raised.

    Several processes: every worker lists every partition of the topic and Bytewax builds
    each on exactly one worker, spreading them over the workers (4 partitions on 2 processes:
    2 each), so every record is read once in the cluster; `on_assigned(part)` is called for
    each partition this process builds.  More workers than partitions leaves some without
    input (they still hold state shards and sink partitions).
    """

    def __init__(self, bootstrap: str, topic: str, tail: bool = True, batch_size: int = 1000,
                 offset_reset: str = "earliest", add_config: dict[str, Any] | None = None,
                 check_every_s: float = 2.0,
                 on_assigned: Callable[[str], None] | None = None) -> None:
        if offset_reset not in ("earliest", "latest"):
            raise ValueError(f"offset_reset must be 'earliest' or 'latest', not {offset_reset!r}")
        self._bootstrap, self._topic, self._tail = bootstrap, topic, tail
        self._batch_size, self._reset, self._check_every_s = (batch_size, offset_reset,
                                                              check_every_s)
        self._add_config = add_config or {}
        self._on_assigned = on_assigned
        self._admin: AdminClient | None = None

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(admin_conf(self._bootstrap, logger=log))
        return self._admin

    def list_parts(self) -> list[str]:
        meta = self._admin_client().list_topics(self._topic, timeout=30).topics[self._topic]
        if meta.error is not None:
            raise RuntimeError(f"cannot list the partitions of {self._topic!r}: {meta.error}")
        return [f"{i}-{self._topic}" for i in sorted(meta.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _KafkaPartition:
        idx, topic = for_part.split("-", 1)
        if topic != self._topic:
            raise ValueError(f"partition {for_part!r} is not of topic {self._topic!r}")
        conf = consumer_conf(
            self._bootstrap, "fraudstream-unused",  # no group: offsets live in the snapshots
            logger=log, **{"enable.auto.commit": False, "enable.partition.eof": not self._tail,
                           "auto.offset.reset": self._reset, **self._add_config})
        part = _KafkaPartition(Consumer(conf), self._admin_client(), TopicPartition(topic, int(idx)),
                               resume_state, self._batch_size, self._reset, self._check_every_s)
        if self._on_assigned is not None:
            self._on_assigned(for_part)
        return part
