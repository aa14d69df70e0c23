"""The live feature worker: Kafka `transactions` -> velocity state -> Feast online store +
offline history, bad events to the dead-letter topic.

Run by `python -m streaming.features` (one process with recovery, metrics, /ready and a tuned
GC), `python -m streaming.features --processes N` (N processes on this host, supervised and
restarted together by `streaming.cluster.LocalCluster`), or one process per host of a cluster:
`python -m streaming.features -i K -a "host0:port;host1:port;..."` (Bytewax's cluster form;
every process gets the same address list, K is its own index in it).  The dataflow itself is
`streaming.flow.build_flow`; this module wires it to the live source, sinks and seeder.

Scaling out: each Kafka partition of `transactions` is read by one process (Bytewax spreads the
input partitions over the workers); events are routed to the process that owns their user's
state shard (`state_shards` keys, routed by Bytewax); the sink has one partition per process,
rows routed by user, so a user's rows are written in order by one writer.  Each process
snapshots into its own recovery partitions; the cluster resumes as a whole from the last epoch
every process committed.

Delivery: with Bytewax recovery (the `python -m streaming.features` default) the input offsets
and per-user state are snapshotted together every `snapshot_interval_s`; a worker killed at any
moment resumes from its last snapshot and replays the events after it.  State updates are
idempotent by `transaction_id` and sink writes idempotent by (user, row timestamp), so nothing
is lost and nothing is counted twice (at-least-once delivery, exactly-once effect).  Users
first seen after the last snapshot continue from their online rows (`streaming.seeding`), and
the state's step id never returns to a stale layout's snapshots (`streaming.recovery`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink
from bytewax.recovery import RecoveryConfig
from bytewax.run import cli_main

from feature_repo.heap import settle_heap
from feature_repo.paths import velocity_history_dir
from scoring.topics import TRANSACTIONS, TRANSACTIONS_DLQ
from streaming import metrics
from streaming.cluster import LocalCluster, parse_args
from streaming.config import StreamingSettings, get_settings
from streaming.events import DeadLetter
from streaming.flow import build_flow
from streaming.kafka_input import KafkaInput
from streaming.readiness import Readiness, ReadinessProbe
from streaming.recovery import ensure_recovery_dir, recovery_partitions, state_step_id
from streaming.seeding import OnlineStateSeeder
from streaming.sources import KafkaDeadLetterSink
from streaming.velocity_sink import VelocityRow, VelocitySink, online_writer

log = logging.getLogger(__name__)

def kafka_source(bootstrap: str, topic: str, tail: bool,
                 on_assigned: Callable[[str], None] | None = None) -> KafkaInput:
    """The live flow's Kafka input (batch size, fetch wait and offset-reset policy from
    `StreamingSettings`; see `streaming.kafka_input.KafkaInput` for lost logs).

    `fetch.wait.max.ms` bounds how long the broker may hold a fetch while it has less than
    `fetch.min.bytes` (1) to answer with: librdkafka's 500 ms default would add up to that
    much to every event's latency on a broker that holds fetches for the full wait.
    `on_assigned(part)`: called for each input partition this process reads.
    """
    s = get_settings()
    return KafkaInput(bootstrap, topic, tail=tail, batch_size=s.source_batch_size,
                      offset_reset=s.offset_reset,
                      add_config={"socket.keepalive.enable": "true",
                                  "fetch.wait.max.ms": str(s.source_fetch_wait_ms)},
                      on_assigned=on_assigned)


def live_flow(
    source: Source[Any],
    sink: Sink[tuple[str, VelocityRow]],
    dlq_sink: Sink[DeadLetter],
    settings: StreamingSettings,
    state_step: str | None = None,
    workers: int = 1,
    readiness: Readiness | None = None,
) -> Dataflow:
    """`build_flow` as the live worker configures it: users seeded from the online store of
    `settings.feature_repo`, `settings.state_shards` state keys, `settings.max_future_seconds`
    (`state_step`: the velocity step's id, see `streaming.recovery.state_step_id`).

    `workers`: of the whole cluster.  With one, the seeder prefetches each micro-batch's users
    where they are keyed (one read per batch); with several, the state of most users lives
    on another worker than the one that read the event, so each state shard prefetches its
    own new users instead.  `readiness`: marked running by a `ReadinessProbe` input.
    """
    flow = build_flow(source, sink, dlq_sink, seed=OnlineStateSeeder(settings.feature_repo),
                      state_shards=settings.state_shards, state_step=state_step,
                      max_future_s=settings.max_future_seconds,
                      prefetch_when_keyed=workers == 1)
    if readiness is not None:
        op.input("ready", flow, ReadinessProbe(readiness))
    return flow


def get_flow(state_step: str | None = None, workers: int = 1,
             readiness: Readiness | None = None) -> Dataflow:
    """The live flow: Kafka `transactions` -> Feast online store + offline history + DLQ
    (`state_step`: the velocity step's id, see `streaming.recovery.state_step_id`; `workers`:
    of the whole cluster, one velocity sink partition each)."""
    s = get_settings()
    on_assigned = None if readiness is None else readiness.partition_assigned
    source = kafka_source(s.bootstrap_servers, TRANSACTIONS, tail=s.tail,
                          on_assigned=on_assigned)
    sink = VelocitySink(s.feature_repo, velocity_history_dir(), partitions=workers,
                        prefix="stream")
    dlq = KafkaDeadLetterSink(s.bootstrap_servers, TRANSACTIONS_DLQ, s.dlq_retry_s)
    return live_flow(source, sink, dlq, s, state_step, workers, readiness)


def warm_up(repo_path: Path) -> None:
    """Open the online store once before the dataflow starts (Feast's store, registry and
    online-store modules, a Redis connection), so the first rows after /ready do not pay for
    it: the seeder and the sink open their own clients lazily.  Best effort: a failure is
    logged, and the flow's own first read or write reports it for real."""
    try:
        OnlineStateSeeder(repo_path).read(["warm-up"])
        online_writer(repo_path).close()
    except Exception as exc:  # noqa: BLE001 - the flow retries and reports for real
        log.warning("online store not warmed up before start: %s", exc)


def run_process(s: StreamingSettings, process_id: int = 0,
                addresses: list[str] | None = None) -> None:
    """This process's part of the dataflow (the only part without `addresses`): metrics and
    /ready, its recovery partitions, the flow, a frozen heap, then Bytewax until the input
    ends (`STREAMING_TAIL=false`) or the process is stopped."""
    processes = len(addresses) if addresses else 1
    readiness = Readiness(process_id, processes)
    metrics.start_metrics_server(s.metrics_host, s.metrics_port, readiness.http)
    ensure_recovery_dir(s.recovery_dir, recovery_partitions(s.recovery_partitions, processes),
                        process_id, processes)
    step = state_step_id(s.recovery_dir, s.state_shards)
    flow = get_flow(step, processes, readiness)
    warm_up(s.feature_repo)
    settle_heap()
    log.info("feature dataflow process %d of %d: %s -> online store + history; state step %s",
             process_id, processes, s.bootstrap_servers, step)
    cli_main(
        flow,
        workers_per_process=1,
        process_id=process_id if addresses else None,
        addresses=addresses,
        epoch_interval=timedelta(seconds=s.snapshot_interval_s),
        recovery_config=RecoveryConfig(
            str(s.recovery_dir), backup_interval=timedelta(seconds=s.backup_interval_s)
        ),
    )


def supervise(s: StreamingSettings, processes: int) -> int:
    """`processes` local processes as one cluster (`streaming.cluster.LocalCluster`), after
    creating the recovery partitions and state layout they share."""
    ensure_recovery_dir(s.recovery_dir, recovery_partitions(s.recovery_partitions, processes))
    state_step_id(s.recovery_dir, s.state_shards)  # the children read the same layout
    log.info("feature dataflow: %d processes, metrics and /ready on ports %d-%d", processes,
             s.metrics_port, s.metrics_port + processes - 1)
    return LocalCluster(processes, metrics_port=s.metrics_port).run()


def main(argv: list[str] | None = None) -> None:
    """One process, `--processes N` local processes, or process `-i` of the cluster `-a`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = get_settings()
    a = parse_args(argv, s.processes)
    if a.addresses is not None:
        run_process(s, a.process_id, a.addresses)
    elif a.processes > 1:
        sys.exit(supervise(s, a.processes))
    else:
        run_process(s)


if __name__ == "__main__":
    main()
