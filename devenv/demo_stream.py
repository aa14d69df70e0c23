"""The streaming part of `make demo`: a card-testing burst on Kafka changes the next score.

Starts its own Tansu broker on a free loopback port (unless `KAFKA_BOOTSTRAP_SERVERS` answers),
the feature dataflow (N processes with `--stream-processes N`) and the streaming scorer, waits
until every dataflow process answers /ready (its start-up time, reported on its own), measures
freshness on single events sent one at a time (send -> the row readable in Redis; median and
max; the first event, which also connects the producer, reported apart), then pushes a burst
of small online payments for one card holder, waits until the velocity features are
servable, and scores again.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from confluent_kafka import Consumer, TopicPartition

from devenv.broker import TansuBroker, kafka_answers
from devenv.localproc import free_port, port_open
from devenv.steps import background, wait_http
from feature_repo.config import PROJECT_DIR, REPO_DIR
from feature_repo.contract import TransactionEvent, to_micros
from scoring.topics import FRAUD_ALERTS, PREDICTIONS, ensure_topics
from streaming.producer import TransactionProducer
from streaming.seeding import OnlineStateSeeder

FRESHNESS_EVENTS = 10  # single events, sent one at a time once the dataflow is ready
READY_TIMEOUT_S = 180.0  # start-up on a busy machine (Python, Bytewax, Feast, cluster)


def _consume_count(bootstrap: str, topic: str, seconds: float) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"demo-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False})
    meta = c.list_topics(topic, timeout=5).topics[topic]
    c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        msgs = c.consume(500, timeout=0.5)
        n += sum(1 for m in msgs if not m.error())
    c.close()
    return n


def stream_part(env: dict[str, str], client: httpx.Client, base: str, user: dict[str, Any],
                show: Callable[[dict[str, Any], str], float], summary: dict[str, Any],
                step: Callable[[str], None], processes: int = 1) -> None:

    bootstrap = env.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    broker = None
    if not kafka_answers(bootstrap):
        broker = TansuBroker(free_port(), log_path=PROJECT_DIR / ".run" / "demo-tansu.log")
        bootstrap = broker.start()
    step(f"stream: Kafka-protocol broker at {bootstrap}, feature dataflow "
         f"({processes} process{'es' if processes > 1 else ''}), streaming scorer")
    ensure_topics(bootstrap)
    run_dir = PROJECT_DIR / ".run" / f"demo-recovery-{uuid.uuid4().hex[:6]}"
    ports = consecutive_free_ports(processes)
    wenv = {**env, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "STREAMING_RECOVERY_DIR": str(run_dir),
            "STREAMING_METRICS_PORT": str(ports[0]),
            "STREAMING_SCORE_METRICS_PORT": str(free_port())}
    py = sys.executable
    try:
        t0 = time.perf_counter()
        with background([py, "-m", "streaming.features", "--processes", str(processes)], wenv,
                        PROJECT_DIR / ".run" / "demo-features.log"), \
             background([py, "-m", "streaming.score"], wenv,
                        PROJECT_DIR / ".run" / "demo-stream-scorer.log"):
            startup = wait_ready(ports, READY_TIMEOUT_S)
            started_s = time.perf_counter() - t0
            print(f"    feature dataflow ready {started_s:.1f}s after launch (start-up: "
                  f"imports, cluster, partitions assigned, state restored; each process: "
                  f"{', '.join(f'{s:.1f}s' for s in startup)})")
            wait_http(f"http://127.0.0.1:{wenv['STREAMING_SCORE_METRICS_PORT']}/metrics",
                      timeout=READY_TIMEOUT_S)
            first, *fresh = single_event_freshness(bootstrap, FRESHNESS_EVENTS + 1)
            median_ms, max_ms = statistics.median(fresh) * 1000, max(fresh) * 1000
            print(f"    first event after ready servable in {first * 1000:.0f} ms (includes "
                  "the producer's connection and the consumers' first fetch)")
            print(f"    freshness over the next {len(fresh)} single events, sent one at a time "
                  f"(send -> row in Redis): median {median_ms:.0f} ms, max {max_ms:.0f} ms")
            n_burst, servable, probe = _burst_until_servable(bootstrap, client, base, user)
            print(f"    card-testing burst servable to the scorer {servable:.2f}s after its "
                  "first send")
            after = show({**probe, "event_timestamp": datetime.now(UTC).isoformat()},
                         "big online payment right after the burst")
            time.sleep(2)
            preds = _consume_count(bootstrap, PREDICTIONS, 3)
            alerts = _consume_count(bootstrap, FRAUD_ALERTS, 2)
            print(f"    streaming scorer: {preds} predictions, {alerts} fraud alerts on Kafka")
            summary["stream"] = (f"dataflow ready in {started_s:.1f}s; freshness median "
                                 f"{median_ms:.0f} ms, max {max_ms:.0f} ms over {len(fresh)} "
                                 f"single events; burst of {n_burst} events servable in "
                                 f"{servable:.2f}s; score after burst {after:.3f}; streaming "
                                 f"scorer wrote {preds} predictions and {alerts} alerts")
    finally:
        if broker is not None:
            with contextlib.suppress(Exception):
                broker.stop()
        with contextlib.suppress(Exception):
            shutil.rmtree(run_dir)


def consecutive_free_ports(n: int) -> list[int]:
    """`n` consecutive free loopback ports (dataflow process k serves on the first + k)."""
    for _ in range(50):
        first = free_port()
        ports = list(range(first, first + n))
        if ports[-1] < 65536 and not any(port_open("127.0.0.1", p) for p in ports[1:]):
            return ports
    raise SystemExit(f"no {n} consecutive free loopback ports")


def wait_ready(ports: list[int], timeout_s: float) -> list[float]:
    """Wait until every dataflow process answers 200 on /ready; their own start-up times."""
    deadline = time.monotonic() + timeout_s
    startup: dict[int, float] = {}
    while time.monotonic() < deadline:
        for port in ports:
            if port in startup:
                continue
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                if r.status_code == 200:
                    startup[port] = float(r.json()["startup_s"])
        if len(startup) == len(ports):
            return [startup[p] for p in ports]
        time.sleep(0.2)
    raise SystemExit(f"the feature dataflow was not ready within {timeout_s:.0f}s "
                     f"(see {PROJECT_DIR / '.run' / 'demo-features.log'})")


def single_event_freshness(bootstrap: str, n: int, timeout_s: float = 30.0) -> list[float]:
    """Send `n` events one at a time, each an ordinary in-store purchase of its own new card
    holder (one card paying every 0.2 s would be card testing, and the streaming scorer would
    rightly alert on it); for each, seconds from just before the send until its row (event
    time to the microsecond) is readable from the online store."""
    reader = OnlineStateSeeder(REPO_DIR)
    run = f"demo-fresh-{uuid.uuid4().hex[:6]}"
    reader.read([f"{run}-0"])  # opens the reader's own store and connection before any timing
    out = []
    with TransactionProducer(bootstrap) as producer:
        for i in range(n):
            ts = datetime.now(UTC)
            user = f"{run}-{i}"
            ev = TransactionEvent(transaction_id=f"{user}-tx", user_id=user,
                                  merchant_id=f"m-fresh-{i % 3}", amount=12.5 + i,
                                  currency="EUR", channel="card_present", event_timestamp=ts)
            want = to_micros(ts)
            t0 = time.perf_counter()
            producer.send(ev)
            producer.flush(10)
            while True:
                (stored,) = reader.read([user])
                if stored is not None and stored[1] >= want:
                    out.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() - t0 > timeout_s:
                    raise SystemExit(f"event {i} of the freshness check was not servable "
                                     f"within {timeout_s:.0f}s")
                time.sleep(0.002)
            time.sleep(0.2)
    return out


def _burst_until_servable(bootstrap: str, client: httpx.Client, base: str, user: dict[str, Any]
                          ) -> tuple[int, float, dict[str, Any]]:
    """Push a card-testing burst for `user`; return (events, seconds until the scorer sees
    them all in `user_txn_count_10m`, the probe transaction used to look)."""
    now = datetime.now(UTC)
    burst = [
        TransactionEvent(
            transaction_id=f"demo-burst-{uuid.uuid4().hex[:8]}", user_id=user["user_id"],
            merchant_id=f"m-risky-{i % 3}", amount=round(1.5 + i * 0.7, 2),
            currency="EUR", channel="online",
            event_timestamp=now - timedelta(seconds=30 - 4 * i),
        )
        for i in range(7)
    ]
    t0 = time.perf_counter()
    with TransactionProducer(bootstrap) as producer:
        for ev in burst:
            producer.send(ev)
    print(f"    pushed a card-testing burst: {len(burst)} small online payments for "
          f"{user['user_id']} in 30 s")
    probe = {"transaction_id": "demo-after", "user_id": user["user_id"],
             "merchant_id": "m-risky-9", "amount": round(user["amount"] * 6, 2),
             "currency": "EUR", "channel": "online",
             "event_timestamp": datetime.now(UTC).isoformat()}
    servable = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = client.post(f"{base}/v1/score?explain=true", json={
            **probe, "event_timestamp": datetime.now(UTC).isoformat()})
        if r.status_code == 200 and (r.json()["features"]["user_txn_count_10m"]["value"]
                                     or 0) >= len(burst):
            servable = time.perf_counter() - t0
            break
        time.sleep(0.2)
    if servable is None:
        raise SystemExit("the burst did not reach the online store within 60 s "
                         f"(see {PROJECT_DIR / '.run' / 'demo-features.log'})")
    return len(burst), servable, probe
