"""confluent-kafka client configurations, written once for every producer, consumer and admin.

Overrides are keyword arguments: `linger_ms=20` becomes `linger.ms`, dotted keys can be passed as
`**{"linger.ms": 20}`, and the Python-only callback keys (`error_cb`, `on_delivery`, `logger` ...)
keep their underscores.

Verified against Tansu 0.6 (the local/test broker) and meant for Apache Kafka in production.
Where the broker is comes from `streaming.config` (`KAFKA_BOOTSTRAP_SERVERS`).
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def bootstrap_servers() -> str:
    """`KAFKA_BOOTSTRAP_SERVERS`, or the local broker's address."""
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or DEFAULT_BOOTSTRAP

# Python-level keys of confluent-kafka whose names really contain underscores.
_PYTHON_KEYS = frozenset(
    {"error_cb", "stats_cb", "throttle_cb", "oauth_cb", "on_delivery", "on_commit", "logger"}
)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    conf = dict(base)
    for key, value in overrides.items():
        name = key if "." in key or key in _PYTHON_KEYS else key.replace("_", ".")
        conf[name] = value
    return conf


def _client_base(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        # Reconnect quickly after a broker restart instead of backing off to 10 s.
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 1000,
    }


def producer_conf(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Producer for durable, ordered, duplicate-free writes per partition while it lives.

    Guarantee: a delivery report without error means every in-sync replica has the record
    (`acks=all`); retries inside `delivery.timeout.ms` (30 s) neither duplicate nor reorder
    (`enable.idempotence`). After that the report carries the error and the caller decides; the
    producer itself never drops silently. At-least-once end to end therefore needs the caller to
    act on delivery reports (retry with a new producer or fail), and `flush()` before exit.

    Caveat (Tansu memory storage): after the broker restarts it forgets producer ids, and an
    idempotent producer created before the restart keeps failing with UNKNOWN_PRODUCER_ID until
    it is replaced; pass `enable_idempotence=False` (at-least-once, may duplicate on retry) for
    a long-lived producer that must ride through such restarts.
    """
    return _merge(
        {
            **_client_base(bootstrap),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "delivery.timeout.ms": 30_000,
            "request.timeout.ms": 10_000,
            "retry.backoff.ms": 100,
            "retry.backoff.max.ms": 1_000,
        },
        overrides,
    )


def consumer_conf(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Group consumer giving at-least-once processing when offsets are stored after the work.

    Guarantee: offsets are committed in the background (`enable.auto.commit`) but only those the
    application stored (`enable.auto.offset.store=False`); call `consumer.store_offsets(msg)`
    after a record is fully processed (or `consumer.commit(msg)` synchronously). A crash then
    replays at most the records processed since the last commit, never skips one; downstream
    writes must be idempotent by key. A new group starts from the earliest retained record.

    `session.timeout.ms=6000` keeps a group's first assignment on Tansu to ~3 s (the 45 s
    default makes it wait ~23 s) and detects a dead member within 6 s.
    """
    return _merge(
        {
            **_client_base(bootstrap),
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": 1_000,
            "session.timeout.ms": 6_000,
            "heartbeat.interval.ms": 2_000,
            "max.poll.interval.ms": 300_000,
        },
        overrides,
    )


def admin_conf(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """AdminClient for topic management and health probes; it neither reads nor writes records."""
    return _merge(_client_base(bootstrap), overrides)
