"""The Kafka topics of the system, their partition counts, and idempotent creation.

`python -m scoring.topics` creates the missing topics on `KAFKA_BOOTSTRAP_SERVERS`; it is the
compose `init` job's command and part of `make up`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future
from types import MappingProxyType

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from scoring.kafka_conf import admin_conf, bootstrap_servers

log = logging.getLogger(__name__)

TRANSACTIONS = "transactions"  # raw card transactions, keyed by user_id
TRANSACTIONS_DLQ = "transactions.dlq"  # events that failed validation, with the reason
FRAUD_ALERTS = "fraud-alerts"  # scored transactions above the alert threshold
PREDICTIONS = "predictions"  # every score, for monitoring and label joins

PARTITIONS: Mapping[str, int] = MappingProxyType(
    {
        TRANSACTIONS: 4,  # keyed by user_id: per-user order, four workers in parallel
        TRANSACTIONS_DLQ: 1,  # low volume, read by humans in arrival order
        FRAUD_ALERTS: 1,  # low volume, one ordered stream for the case-management consumer
        PREDICTIONS: 2,  # one record per transaction, consumed in bulk
    }
)

_ATTEMPT_TIMEOUT_S = 2.0


def ensure_topics(
    bootstrap_servers: str,
    timeout_s: float = 30,
    partitions: Mapping[str, int] = PARTITIONS,
    replication_factor: int = -1,
) -> list[str]:
    """Create the topics in `partitions` that do not exist yet; return the names it created.

    Idempotent: an existing topic is left as it is (a partition count different from the one
    asked for is logged as a warning, never changed). Retries while the broker is unreachable or
    still starting, up to `timeout_s` in total, then raises `TimeoutError`; a non-retriable
    broker error (e.g. invalid configuration) raises `KafkaException` at once.
    `replication_factor=-1` uses the broker's default.
    """
    # librdkafka's own log lines (connection refused while the broker starts) go to `log`.
    admin = AdminClient(admin_conf(bootstrap_servers, logger=log))
    deadline = time.monotonic() + timeout_s
    created: list[str] = []
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            missing = _missing(admin, partitions, deadline)
            if not missing:
                return created
            futures = admin.create_topics(
                [NewTopic(name, partitions[name], replication_factor) for name in missing],
                request_timeout=_ATTEMPT_TIMEOUT_S,
            )
            for name, future in futures.items():
                if _created(name, future):
                    created.append(name)
                    log.info("created topic %s (%d partitions)", name, partitions[name])
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and not _retriable(error):
                raise
            last_error = exc
            log.debug("broker at %s not ready: %s", bootstrap_servers, exc)
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(
        f"could not ensure topics on {bootstrap_servers} within {timeout_s} s: {last_error}"
    )


def _missing(admin: AdminClient, partitions: Mapping[str, int], deadline: float) -> list[str]:
    """Names in `partitions` absent from the cluster; warns about partition-count drift."""
    timeout = max(0.1, min(_ATTEMPT_TIMEOUT_S, deadline - time.monotonic()))
    existing = admin.list_topics(timeout=timeout).topics
    for name, wanted in partitions.items():
        if name in existing and len(existing[name].partitions) != wanted:
            log.warning(
                "topic %s has %d partitions, expected %d (left unchanged)",
                name,
                len(existing[name].partitions),
                wanted,
            )
    return [name for name in partitions if name not in existing]


def _created(name: str, future: Future[None]) -> bool:
    """Wait for one create_topics future: True if created, False if it already existed."""
    try:
        future.result()
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise
    return True


def _retriable(error: KafkaError) -> bool:
    """Errors that mean "broker not up yet / try again", as opposed to a wrong request."""
    local_transient = {
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_CONTROLLER,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    }
    return error.retriable() or error.code() in local_transient


def main() -> None:
    """Entry point of `python -m scoring.topics`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bootstrap = bootstrap_servers()
    created = ensure_topics(bootstrap)
    log.info(
        "topics ready on %s (created: %s)", bootstrap, ", ".join(created) if created else "none"
    )


if __name__ == "__main__":
    main()
