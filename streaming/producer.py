"""`TransactionProducer`: publish `TransactionEvent`s to the `transactions` topic.

```python
from streaming.producer import TransactionProducer

with TransactionProducer("127.0.0.1:9092") as producer:
    producer.send(event)  # a feature_repo.contract.TransactionEvent
# leaving the block flushes and raises RuntimeError if any event was not delivered;
# without the block, call `failures = producer.flush()` yourself
```

Wire format (see docs/events.md): key = `user_id` (UTF-8), so all events of a user go to one
partition and keep their order; value = `event.model_dump_json()` (schema version 1 JSON); the
record timestamp is the producer's clock (CreateTime), which the dataflow uses to measure
freshness.

Delivery guarantee: at-least-once *if the caller acts on `flush()`*.  The producer uses
`scoring.kafka_conf.producer_conf` (acks=all, idempotent, retries for 30 s); every record
ends with a delivery report, and `flush()` returns how many records failed or were still
undelivered when its timeout ran out.  A non-zero result means those events may be lost: resend
them with a new producer or report the failure (an idempotent producer that outlived a
restart of Tansu's in-memory broker keeps failing: replace it).  Consumers must tolerate
duplicates (the feature dataflow ignores a repeated `transaction_id`).
"""

from __future__ import annotations

import logging
import re
import time
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from feature_repo.contract import TransactionEvent
from scoring.kafka_conf import producer_conf
from scoring.topics import TRANSACTIONS
from streaming.config import get_settings

log = logging.getLogger(__name__)

_MAX_LOGGED_ERRORS = 10
_IDEMP_ASSIGNED = re.compile(r'"idemp_state":\s*"Assigned"')
READY_STATS_INTERVAL_MS = 50  # librdkafka statistics, read only for the producer-id state


class TransactionProducer:
    """A Kafka producer of schema-v1 transaction events, counting delivery outcomes.

    `bootstrap` defaults to `KAFKA_BOOTSTRAP_SERVERS` (streaming settings); `overrides` are
    passed to `producer_conf` (e.g. `linger_ms=50`).  Not thread-safe: use one per thread.
    Counters: `sent` (accepted into the local queue), `delivered` (acknowledged by the
    broker), `failed` (delivery report with an error); `errors` keeps the first few errors.
    """

    def __init__(
        self, bootstrap: str | None = None, topic: str = TRANSACTIONS, track_ready: bool = False,
        **overrides: Any
    ) -> None:
        if bootstrap is None:
            bootstrap = get_settings().bootstrap_servers
        self.bootstrap = bootstrap
        self.topic = topic
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self.errors: list[str] = []
        conf = producer_conf(bootstrap, logger=log, **overrides)
        self._idempotent = bool(conf.get("enable.idempotence"))
        self._ready = False
        if track_ready:  # librdkafka reports its producer-id state only in its statistics
            conf.update({"statistics.interval.ms": READY_STATS_INTERVAL_MS,
                         "stats_cb": self._on_stats})
        self._track_ready = track_ready
        self._producer = Producer(conf)

    def wait_ready(self, timeout_s: float = 10.0) -> bool:
        """Wait until a record sent now would go out at once; False if `timeout_s` ran out.

        A new idempotent producer holds its records until the broker has given it a producer
        id, which librdkafka first asks for about 0.5 s after start: records sent before are
        stamped (CreateTime) that much before they can leave.  Live traffic comes from
        producers that are long up, so a measurement of freshness waits for this first.
        Needs `track_ready=True`.
        """
        if not self._track_ready:
            raise ValueError("wait_ready needs a producer created with track_ready=True")
        deadline = time.monotonic() + timeout_s
        try:  # connected, metadata known
            self._producer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException as exc:  # no broker answered in time
            log.warning("producer not ready: %s", exc)
            return False
        while self._idempotent and not self._ready:  # only idempotence waits for an id
            if time.monotonic() >= deadline:
                return False
            self._producer.poll(0.02)
        return True

    def _on_stats(self, stats: str) -> None:
        if not self._ready and _IDEMP_ASSIGNED.search(stats):
            self._ready = True

    def send(self, event: TransactionEvent) -> None:
        """Queue one event (non-blocking unless the local queue is full)."""
        self.send_raw(event.user_id, event.model_dump_json().encode())

    def send_raw(self, key: str | bytes | None, value: bytes) -> None:
        """Queue an already-serialised record as is (forwarding, replays, fault tests).

        Nothing is validated: a malformed value ends up in `transactions.dlq`.
        """
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, on_delivery=self._report)
                break
            except BufferError:  # local queue full: let delivery reports drain it
                self._producer.poll(0.1)
        self.sent += 1
        self._producer.poll(0)  # serve delivery reports of earlier records

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve pending delivery reports; return how many were served."""
        return int(self._producer.poll(timeout_s))

    @property
    def pending(self) -> int:
        """Records queued or in flight, without a delivery report yet."""
        return len(self._producer)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait up to `timeout_s` for every delivery report; return the number of failures.

        Failures = records whose report carried an error + records still unacknowledged when
        the timeout ran out (they may or may not reach the broker later).
        """
        remaining = int(self._producer.flush(timeout_s))
        return self.failed + remaining

    def _report(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        if len(self.errors) < _MAX_LOGGED_ERRORS:
            key = (msg.key() or b"").decode("utf-8", "replace")
            self.errors.append(f"key={key}: {err.str()}")
            log.warning("delivery failed for key %s: %s", key, err.str())

    def __enter__(self) -> TransactionProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failures = self.flush()
        if failures and exc_type is None:
            raise RuntimeError(
                f"{failures} of {self.sent} events not delivered to {self.topic}: "
                + "; ".join(self.errors)
            )
