"""The Kafka plumbing against a real Tansu broker: topics, keyed round trip, offset commits,
and the `devenv.services` lifecycle behind `make up` / `make down`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient

from devenv.broker import TansuBroker, kafka_answers
from devenv.localproc import free_port, pid_alive, port_open, read_pid, stop_pid
from scoring.kafka_conf import admin_conf, consumer_conf, producer_conf
from scoring.topics import PARTITIONS, TRANSACTIONS, ensure_topics

PROJECT_DIR = Path(__file__).resolve().parents[3]
CONSUME_BOUND_S = 20.0  # first assignment takes ~3 s on Tansu with session.timeout.ms=6000


def _partition_counts(bootstrap: str) -> dict[str, int]:
    topics = AdminClient(admin_conf(bootstrap)).list_topics(timeout=5).topics
    return {name: len(meta.partitions) for name, meta in topics.items()}


def _produce(bootstrap: str, topic: str, records: list[tuple[str, str]]) -> list[Message]:
    delivered: list[Message] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        delivered.append(msg)

    producer = Producer(producer_conf(bootstrap))
    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(10) == 0
    assert len(delivered) == len(records)
    return delivered


def _text(msg: Message) -> str:
    return (msg.value() or b"").decode()


def _consume(consumer: Consumer, count: int, wanted: set[bytes] | None = None) -> list[Message]:
    """Poll until `count` records (whose value is in `wanted`, if given) or the bound."""
    got: list[Message] = []
    deadline = time.monotonic() + CONSUME_BOUND_S
    while len(got) < count and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            continue
        if wanted is None or msg.value() in wanted:
            got.append(msg)
    return got


@pytest.mark.integration
def test_topics_exist_with_their_partition_counts_and_creation_is_idempotent(
    kafka_bootstrap: str,
) -> None:
    assert ensure_topics(kafka_bootstrap) == []
    assert ensure_topics(kafka_bootstrap) == []
    counts = _partition_counts(kafka_bootstrap)
    assert {name: counts.get(name) for name in PARTITIONS} == dict(PARTITIONS)


@pytest.mark.integration
def test_restart_keeps_the_port_but_starts_empty(kafka_broker: TansuBroker) -> None:
    bootstrap = kafka_broker.bootstrap
    assert kafka_broker.restart() == bootstrap
    assert not set(PARTITIONS) & set(_partition_counts(bootstrap))  # memory storage: all gone
    assert sorted(ensure_topics(bootstrap)) == sorted(PARTITIONS)
    assert ensure_topics(bootstrap) == []


@pytest.mark.integration
def test_keyed_record_comes_back_through_a_consumer_group(
    kafka_bootstrap: str, unique_name: str
) -> None:
    value = uuid.uuid4().hex
    [sent] = _produce(kafka_bootstrap, TRANSACTIONS, [("user-42", value)])
    consumer = Consumer(consumer_conf(kafka_bootstrap, unique_name))
    try:
        consumer.subscribe([TRANSACTIONS])
        started = time.monotonic()
        [got] = _consume(consumer, 1, wanted={value.encode()})
        assert time.monotonic() - started < CONSUME_BOUND_S
        assert got.key() == b"user-42"
        assert (got.partition(), got.offset()) == (sent.partition(), sent.offset())
        consumer.store_offsets(message=got)
    finally:
        consumer.close()


@pytest.mark.integration
def test_a_new_consumer_resumes_after_the_group_committed_offset(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = f"scratch-{unique_name}"
    ensure_topics(kafka_bootstrap, partitions={topic: 1})
    values = [f"{unique_name}-{i}" for i in range(4)]
    _produce(kafka_bootstrap, topic, [("k", v) for v in values])

    first = Consumer(consumer_conf(kafka_bootstrap, unique_name))
    first.subscribe([topic])
    head = _consume(first, 2)
    first.commit(message=head[-1], asynchronous=False)
    first.close()
    assert [_text(m) for m in head] == values[:2]

    second = Consumer(consumer_conf(kafka_bootstrap, unique_name))
    second.subscribe([topic])
    tail = _consume(second, 2)
    second.close()
    assert [_text(m) for m in tail] == values[2:]


@pytest.mark.integration
def test_services_up_is_idempotent_and_down_stops_what_it_started(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    kafka_port, redis_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_DIR),
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",  # never the shared Redis
    }

    def services(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devenv.services", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    run_dir = tmp_path / ".run"
    try:
        first = services("up")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "started Tansu" in first.stdout and "started redis-server" in first.stdout
        pids = {name: read_pid(run_dir / f"{name}.pid") for name in ("kafka", "redis")}
        assert all(pid is not None and pid_alive(pid) for pid in pids.values())
        assert kafka_answers(env["KAFKA_BOOTSTRAP_SERVERS"])

        again = services("up")
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("already running") == 2
        assert {name: read_pid(run_dir / f"{name}.pid") for name in pids} == pids
        assert services("status").returncode == 0

        stopped = services("down")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not any(pid_alive(pid) for pid in pids.values() if pid is not None)
        assert not port_open("127.0.0.1", kafka_port) and not port_open("127.0.0.1", redis_port)
        assert not list(run_dir.glob("*.pid"))
        assert services("down").returncode == 0  # nothing left to stop is fine
    finally:
        for pid_file in run_dir.glob("*.pid"):
            pid = read_pid(pid_file)
            if pid is not None:
                stop_pid(pid, 5)


def test_conf_overrides_take_python_names_and_keep_callback_keys() -> None:
    def on_error(err: KafkaError) -> None: ...

    conf = producer_conf("h:1", linger_ms=20, error_cb=on_error, **{"batch.size": 1000})
    assert (conf["linger.ms"], conf["batch.size"], conf["error_cb"]) == (20, 1000, on_error)
    assert conf["acks"] == "all" and conf["enable.idempotence"] is True
    group = consumer_conf("h:1", "g", enable_auto_commit=False)
    assert group["enable.auto.commit"] is False and group["session.timeout.ms"] == 6000


@pytest.mark.integration
def test_wait_ready_returns_once_the_broker_assigned_a_producer_id(kafka_bootstrap: str) -> None:
    """`streaming.produce` starts its clock only then: before, records wait ~0.5 s unsent."""
    from streaming.producer import TransactionProducer

    with pytest.raises(ValueError, match="track_ready"):
        TransactionProducer(kafka_bootstrap).wait_ready(1)
    producer = TransactionProducer(kafka_bootstrap, track_ready=True)
    assert producer.wait_ready(20)
    assert producer._ready  # seen in librdkafka's statistics, not assumed after a timeout
    plain = TransactionProducer(kafka_bootstrap, track_ready=True, enable_idempotence=False)
    assert plain.wait_ready(20)  # no producer id to wait for
    plain.flush(1)
