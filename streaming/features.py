"""The live feature worker: Kafka `transactions` -> velocity state -> Feast online store +
offline history, bad events to the dead-letter topic.

Run by `python -m streaming.features` (one worker with recovery, metrics and a tuned GC) or
`python -m bytewax.run streaming.features:get_flow`.  The dataflow itself is
`streaming.flow.build_flow`; this module wires it to the live source, sinks and seeder.

Delivery: with Bytewax recovery (the `python -m streaming.features` default) the input offsets
and per-user state are snapshotted together every `snapshot_interval_s`; a worker killed at any
moment resumes from its last snapshot and replays the events after it.  State updates are
idempotent by `transaction_id` and sink writes idempotent by (user, row timestamp), so nothing
is lost and nothing is counted twice (at-least-once delivery, exactly-once effect).  Users
first seen after the last snapshot continue from their online rows (`streaming.seeding`), and
the state's step id never returns to a stale layout's snapshots (`streaming.recovery`).
"""

from __future__ import annotations

import gc
import logging
from datetime import timedelta
from typing import Any

from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink
from bytewax.recovery import RecoveryConfig
from bytewax.run import cli_main

from feature_repo.paths import velocity_history_dir
from scoring.topics import TRANSACTIONS, TRANSACTIONS_DLQ
from streaming import metrics
from streaming.config import StreamingSettings, get_settings
from streaming.events import DeadLetter
from streaming.flow import build_flow
from streaming.kafka_input import KafkaInput
from streaming.recovery import ensure_recovery_dir, state_step_id
from streaming.seeding import OnlineStateSeeder
from streaming.sources import KafkaDeadLetterSink
from streaming.velocity_sink import VelocityRow, VelocitySink

log = logging.getLogger(__name__)

GC_THRESHOLDS = (100_000, 50, 100)  # generation 0 allocations, then collections of 0 and 1


def kafka_source(bootstrap: str, topic: str, tail: bool) -> KafkaInput:
    """The live flow's Kafka input (batch size, fetch wait and offset-reset policy from
    `StreamingSettings`; see `streaming.kafka_input.KafkaInput` for lost logs).

    `fetch.wait.max.ms` bounds how long the broker may hold a fetch while it has less than
    `fetch.min.bytes` (1) to answer with: librdkafka's 500 ms default would add up to that
    much to every event's latency on a broker that holds fetches for the full wait.
    """
    s = get_settings()
    return KafkaInput(bootstrap, topic, tail=tail, batch_size=s.source_batch_size,
                      offset_reset=s.offset_reset,
                      add_config={"socket.keepalive.enable": "true",
                                  "fetch.wait.max.ms": str(s.source_fetch_wait_ms)})


def live_flow(
    source: Source[Any],
    sink: Sink[tuple[str, VelocityRow]],
    dlq_sink: Sink[DeadLetter],
    settings: StreamingSettings,
    state_step: str | None = None,
) -> Dataflow:
    """`build_flow` as the live worker configures it: users seeded from the online store of
    `settings.feature_repo`, `settings.state_shards` state keys, `settings.max_future_seconds`
    (`state_step`: the velocity step's id, see `streaming.recovery.state_step_id`)."""
    return build_flow(source, sink, dlq_sink, seed=OnlineStateSeeder(settings.feature_repo),
                      state_shards=settings.state_shards, state_step=state_step,
                      max_future_s=settings.max_future_seconds)


def get_flow(state_step: str | None = None) -> Dataflow:
    """The live flow: Kafka `transactions` -> Feast online store + offline history + DLQ
    (`state_step`: the velocity step's id, see `streaming.recovery.state_step_id`)."""
    s = get_settings()
    source = kafka_source(s.bootstrap_servers, TRANSACTIONS, tail=s.tail)
    sink = VelocitySink(s.feature_repo, velocity_history_dir(), prefix="stream")
    dlq = KafkaDeadLetterSink(s.bootstrap_servers, TRANSACTIONS_DLQ, s.dlq_retry_s)
    return live_flow(source, sink, dlq, s, state_step)


def tune_gc() -> None:
    """After start-up: freeze the heap and collect the young generation less often.

    Start-up objects never need collecting (`gc.freeze`).  Per event the flow allocates many
    short-lived, acyclic objects while the per-user states are long lived: at the default
    thresholds (700, 10, 10) the collections rescan the states again and again (their cost is
    in docs/benchmarks.md).  Cycles are still collected, only in larger steps.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main() -> None:
    """Run the live flow on one worker with recovery, metrics and a frozen heap."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = get_settings()
    metrics.start_metrics_server(s.metrics_host, s.metrics_port)
    ensure_recovery_dir(s.recovery_dir, s.recovery_partitions)
    step = state_step_id(s.recovery_dir, s.state_shards)
    flow = get_flow(step)
    tune_gc()
    log.info("feature dataflow: %s -> online store + history; state step %s",
             s.bootstrap_servers, step)
    cli_main(
        flow,
        workers_per_process=1,
        epoch_interval=timedelta(seconds=s.snapshot_interval_s),
        recovery_config=RecoveryConfig(
            str(s.recovery_dir), backup_interval=timedelta(seconds=s.backup_interval_s)
        ),
    )


if __name__ == "__main__":
    main()
