"""The streaming part of `make demo`: a card-testing burst on Kafka changes the next score.

Starts its own Tansu broker on a free loopback port (unless `KAFKA_BOOTSTRAP_SERVERS` answers),
the feature dataflow and the streaming scorer, pushes a burst of small online payments for one
card holder, waits until the velocity features are servable, and scores again.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from confluent_kafka import Consumer, TopicPartition

from devenv.broker import TansuBroker, kafka_answers
from devenv.localproc import free_port
from devenv.steps import background, wait_http
from feature_repo.config import PROJECT_DIR
from feature_repo.contract import TransactionEvent
from scoring.topics import FRAUD_ALERTS, PREDICTIONS, ensure_topics
from streaming.producer import TransactionProducer


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
                step: Callable[[str], None]) -> None:

    bootstrap = env.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    broker = None
    if not kafka_answers(bootstrap):
        broker = TansuBroker(free_port(), log_path=PROJECT_DIR / ".run" / "demo-tansu.log")
        bootstrap = broker.start()
    step(f"stream: Kafka-protocol broker at {bootstrap}, feature dataflow, streaming scorer")
    ensure_topics(bootstrap)
    run_dir = PROJECT_DIR / ".run" / f"demo-recovery-{uuid.uuid4().hex[:6]}"
    wenv = {**env, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "STREAMING_RECOVERY_DIR": str(run_dir),
            "STREAMING_METRICS_PORT": str(free_port()),
            "STREAMING_SCORE_METRICS_PORT": str(free_port())}
    py = sys.executable
    try:
        with background([py, "-m", "streaming.features"], wenv,
                        PROJECT_DIR / ".run" / "demo-features.log"), \
             background([py, "-m", "streaming.score"], wenv,
                        PROJECT_DIR / ".run" / "demo-stream-scorer.log"):
            for port in (wenv["STREAMING_METRICS_PORT"], wenv["STREAMING_SCORE_METRICS_PORT"]):
                wait_http(f"http://127.0.0.1:{port}/metrics", timeout=120)
            time.sleep(3)  # metrics answer just before the flows assign their partitions
            n_burst, servable, probe = _burst_until_servable(bootstrap, client, base, user)
            print(f"    velocity features servable {servable:.2f}s after the first send "
                  "(includes the dataflow's micro-batching)")
            after = show({**probe, "event_timestamp": datetime.now(UTC).isoformat()},
                         "big online payment right after the burst")
            time.sleep(2)
            preds = _consume_count(bootstrap, PREDICTIONS, 3)
            alerts = _consume_count(bootstrap, FRAUD_ALERTS, 2)
            print(f"    streaming scorer: {preds} predictions, {alerts} fraud alerts on Kafka")
            summary["stream"] = (f"burst of {n_burst} events servable in {servable:.2f}s; "
                                 f"score after burst {after:.3f}; streaming scorer wrote "
                                 f"{preds} predictions and {alerts} alerts")
    finally:
        if broker is not None:
            with contextlib.suppress(Exception):
                broker.stop()
        with contextlib.suppress(Exception):
            shutil.rmtree(run_dir)


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
