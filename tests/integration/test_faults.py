"""Fault injection: break one dependency on purpose and check the documented behaviour.

Scenarios (docs/operations.md describes the behaviour they pin down):

a. Redis stopped (SIGSTOP) and killed under load: every scoring request answers within a bound
   with 503 + Retry-After, /ready turns 503, and both recover by themselves.
b. The broker stopped and restarted: producers report undelivered events (or deliver them
   after the restart, within their delivery timeout), the produce CLI exits non-zero, and the
   feature worker survives the restart, notices the lost log and processes every event sent
   once after it.
c. The feature worker SIGKILLed three times during a replay with recovery enabled: the online
   rows and the offline history equal an in-memory oracle exactly.
d. Corrupt or tampered model artifacts: refused at start-up with an error naming the file,
   and refused on reload while the previous model keeps serving.

Every process these tests start (redis-server, Tansu, workers, the produce CLI) is their own,
on 127.0.0.1 ports picked free, and is killed by pid in `finally`.  The worker scenarios use
a private redis-server, so other test sessions flushing the shared test database cannot
interfere.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import joblib
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from fastapi.testclient import TestClient

from devenv.broker import TansuBroker
from devenv.localproc import free_port
from feature_repo.config import REPO_DIR
from feature_repo.contract import TransactionEvent, to_micros
from feature_repo.velocity import ROW_FIELDS, UserVelocityState
from scoring.artifact import METADATA_FILE, MODEL_FILE, ArtifactError, sha256_file
from scoring.kafka_conf import consumer_conf
from scoring.registry import Registry
from scoring.topics import TRANSACTIONS, TRANSACTIONS_DLQ, ensure_topics
from serving.app import create_app
from serving.config import ServingSettings
from streaming.producer import TransactionProducer
from streaming.velocity_sink import VELOCITY_VIEW, VelocityRow, history_table
from tests import procs
from tests.integration.streaming.test_streaming import (
    Worker,
    event,
    events_total,
    history,
    wait_for,
)
from tests.procs import clone_artifact

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
# Per answer while Redis is down: the scorer's lookup deadline (SERVING_LOOKUP_TIMEOUT_S, set
# below), whatever the reader's retries and socket timeouts would add up to, + 1 s of slack for
# a loaded 2-core machine.
LOOKUP_TIMEOUT_S = 0.5
ANSWER_BOUND_S = LOOKUP_TIMEOUT_S + 1.0
RECOVERY_BOUND_S = 10.0
BROKER_DOWN_S = 8.0  # long enough for every client to notice (all brokers down)
WORKER_START_S = 90.0  # Python + Bytewax + Feast registry: ~8 s here, much more when busy


# --- a private redis-server --------------------------------------------------------------------


class RedisServer:
    """`redis-server` on a free loopback port, without persistence: a restart is empty."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        wait_for("redis-server to answer", lambda: _pings(client), 15)
        return self

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (works on a stopped process too) and reap. Idempotent."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@contextmanager
def redis_env(server: RedisServer) -> Iterator[None]:
    """REDIS_URL pointing at `server` (read when a feature store config is built)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDIS_URL", server.url)
        yield


def open_store() -> Any:
    from feast import FeatureStore

    return FeatureStore(repo_path=str(REPO_DIR))


def velocity_rows(user: str, events: list[TransactionEvent]) -> list[VelocityRow]:
    """The oracle: `UserVelocityState` over `events` in order, in memory."""
    state = UserVelocityState()
    rows = []
    for e in events:
        row = state.apply(e.transaction_id, to_micros(e.event_timestamp), e.amount,
                          e.merchant_id)
        if row is not None:
            rows.append(VelocityRow(user, row))
    return rows


def online_velocity(store: Any, users: list[str]) -> dict[str, dict[str, Any] | None]:
    """user -> its online `user_velocity_fv` row with `row_ts_us`, None when absent."""
    from feast.infra.online_stores.helpers import get_online_store_from_config
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    online = get_online_store_from_config(store.config.online_store)
    keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)]) for u in users]
    got = online.online_read(store.config, store.get_feature_view(VELOCITY_VIEW), keys,
                             list(ROW_FIELDS))
    out: dict[str, dict[str, Any] | None] = {}
    for user, (ts, values) in zip(users, got, strict=True):
        if ts is None or not values or ts.year < 2000:
            out[user] = None
            continue
        row = {f: feast_value_type_to_python_type(values[f]) for f in ROW_FIELDS}
        out[user] = {"row_ts_us": to_micros(ts), **{f: list(v or []) for f, v in row.items()}}
    return out


# --- (a) Redis stopped and killed under load ---------------------------------------------------


@dataclass(frozen=True)
class Answer:
    start: float
    end: float
    status: int | None  # None: the client gave up (timeout, connection error)
    retry_after: str | None
    body: str


class Load:
    """Clients posting back to back in threads, recording every answer, until stopped."""

    def __init__(self, base_url: str, path: str, body: dict[str, Any], threads: int = 2):
        self.base_url, self.path, self.body = base_url, path, body
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.post(self.path, json=self.body)
                    a = Answer(t0, time.monotonic(), r.status_code, r.headers.get("retry-after"),
                               r.text)
                except httpx.HTTPError as exc:
                    a = Answer(t0, time.monotonic(), None, None, repr(exc))
                self.answers.append(a)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def since(self, t: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.start >= t]

    def within(self, t0: float, t1: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.start >= t0 and a.end <= t1]


@contextmanager
def serve(settings: dict[str, str], log_path: Path) -> Iterator[str]:
    """`tests.procs.serve`, yielding only the base URL.  Its own process: the test's Feast
    writes and clients never share an interpreter (or a GIL) with it."""
    with procs.serve(settings, log_path) as (base, _):
        yield base


def timed_get(base_url: str, path: str) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = httpx.get(base_url + path, timeout=5.0)
    return r, time.monotonic() - t0


def test_redis_stopped_or_killed_is_a_quick_503_and_recovers_by_itself(
    trained_artifact: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis.log").start()
    user, merchant = f"rds-{uuid.uuid4().hex[:8]}", "rds-shop"
    now = datetime.now(UTC)
    history_events = [
        event(f"{user}-{i}", user, now - timedelta(minutes=30 - 10 * i), 10.0 + i, merchant)
        for i in range(3)
    ]
    body = {"transaction_id": f"{user}-q", "user_id": user, "merchant_id": merchant,
            "amount": 25.0, "currency": "EUR", "channel": "online"}
    artifact = clone_artifact(trained_artifact, tmp_path / "models", "faults-redis")
    Registry(artifact.parent).register(artifact)
    scorer_env = {"SERVING_MODEL_DIR": str(artifact.parent), "SERVING_MODEL_VERSION": artifact.name,
                  "SERVING_RELOAD_INTERVAL_S": "0", "SERVING_RETRY_AFTER_SECONDS": "2",
                  "SERVING_LOOKUP_TIMEOUT_S": str(LOOKUP_TIMEOUT_S)}

    def load_features() -> None:  # the tiny feature set: one velocity row
        rows = velocity_rows(user, history_events)[-1:]
        fs.write_to_online_store(VELOCITY_VIEW, df=history_table(rows).to_pandas())

    def served_with_features(answers: list[Answer]) -> bool:
        return any(a.status == 200 and "user_seconds_since_last_txn"
                   not in json.loads(a.body)["missing_features"] for a in answers)

    try:
        with redis_env(server):  # read by the scorer (inherited) and by `fs`
            fs = open_store()
            load_features()
            with serve(scorer_env, tmp_path / "scorer.log") as base, \
                    Load(base, "/v1/score", body) as load:
                t = time.monotonic()
                wait_for("a scored request with the stored features",
                         lambda: served_with_features(load.since(t)), 30)
                assert timed_get(base, "/ready")[0].status_code == 200

                # 1. Redis frozen: connections open, nothing answers (read timeouts)
                t_pause = time.monotonic()
                server.pause()
                time.sleep(3.0)
                ready_frozen, ready_frozen_s = timed_get(base, "/ready")
                t_resume = time.monotonic()
                server.resume()
                wait_for("a 200 after SIGCONT",
                         lambda: any(a.status == 200 for a in load.since(t_resume)),
                         RECOVERY_BOUND_S)

                # 2. Redis killed: connections refused; then restarted empty on the same port
                t_kill = time.monotonic()
                server.kill()
                time.sleep(2.0)
                ready_dead, ready_dead_s = timed_get(base, "/ready")
                t_restart = time.monotonic()
                server.start()
                wait_for("a 200 after the restart",
                         lambda: any(a.status == 200 for a in load.since(t_restart)),
                         RECOVERY_BOUND_S)
                wait_for("/ready 200 after the restart",
                         lambda: timed_get(base, "/ready")[0].status_code == 200, RECOVERY_BOUND_S)
                load_features()  # the stream / materialization refill it; the scorer reads it again
                t_refilled = time.monotonic()
                wait_for("the stored features after the refill",
                         lambda: served_with_features(load.since(t_refilled)), RECOVERY_BOUND_S)
                answers = list(load.answers)
    finally:
        server.kill()

    # never a hang, never a 500: every answer a 200 or a 503 with Retry-After, within the bound
    odd = [a for a in answers if a.status not in (200, 503)]
    assert not odd, odd[:3]
    for a in answers:
        if a.status == 503:
            assert a.retry_after == "2"
            detail = json.loads(a.body)["detail"]
            # A lookup sent while Redis was frozen whose deadline passed just after SIGCONT saw
            # Redis answer other reads before it gave up: that one may say "overloaded" (the
            # scorer's rule, serving/service.py).  Every other 503 is an outage.
            # The scorer counts only answers in the last half of the wait (deadline / 2 before
            # it gave up, which is at least start + deadline / 2); replies already in the socket
            # when Redis stopped may be read a little after t_pause, hence the 50 ms.
            straddled = a.start < t_resume <= a.end
            froze_late = t_pause + 0.05 > a.start + LOOKUP_TIMEOUT_S / 2
            allowed = {"online feature store unavailable"} | (
                {"overloaded"} if straddled or froze_late else set())
            assert detail in allowed, (a, {"pause": t_pause, "resume": t_resume})
    slowest = max(a.end - a.start for a in answers)
    marks = {"pause": t_pause, "resume": t_resume, "kill": t_kill, "restart": t_restart}
    worst = max(answers, key=lambda a: a.end - a.start)
    assert slowest < ANSWER_BOUND_S, (
        f"slowest answer took {slowest:.2f} s: {worst.status} started "
        + ", ".join(f"{worst.start - t:+.2f} s from {name}" for name, t in marks.items()))
    for t0, t1 in ((t_pause, t_resume), (t_kill, t_restart)):
        during = load.within(t0 + 0.05, t1)
        assert during and all(a.status == 503 for a in during), [a.status for a in during]
    for ready, took in ((ready_frozen, ready_frozen_s), (ready_dead, ready_dead_s)):
        assert ready.status_code == 503 and ready.headers["retry-after"] == "2"
        assert ready.json()["checks"] == {"model": True, "redis": False, "registry": True}
        assert took < ANSWER_BOUND_S, f"/ready took {ready_frozen_s:.2f} s (frozen), {ready_dead_s:.2f} s (dead)"
    print(f"{len(answers)} answers, {sum(a.status == 503 for a in answers)} 503s, slowest "
          f"{slowest:.2f} s; /ready frozen {ready_frozen_s:.2f} s, dead {ready_dead_s:.2f} s")


# --- shared by (b) and (c): a private Redis for the worker subprocesses ----------------------


@pytest.fixture(scope="module")
def worker_redis(tmp_path_factory: pytest.TempPathFactory,
                 store: Any) -> Iterator[tuple[RedisServer, Any]]:
    """A redis-server of this module's own, and a FeatureStore reading it.

    Workers started while the fixture is active inherit REDIS_URL pointing at it.
    """
    server = RedisServer(tmp_path_factory.mktemp("worker-redis") / "redis.log").start()
    try:
        with redis_env(server):
            yield server, open_store()
    finally:
        server.kill()


def start_worker(worker: Worker, fs: Any) -> None:
    """Start `worker` and wait until a warm-up event of its own reached the online store."""
    worker.start()
    user = f"warm-{uuid.uuid4().hex[:8]}"
    with TransactionProducer(worker.bootstrap) as producer:
        producer.send(event(f"{user}-0", user, datetime.now(UTC), 1.0, "m-warm"))

    def ready() -> bool:
        if not worker.alive():
            raise AssertionError(f"worker exited during start-up:\n{worker.log_tail()}")
        return online_velocity(fs, [user])[user] is not None

    wait_for("the worker to start", ready, WORKER_START_S)


def applied(worker: Worker) -> float:
    """Events the worker process applied so far (0 while its metrics are not up yet)."""
    if not worker.alive():
        raise AssertionError(f"worker died:\n{worker.log_tail()}")
    try:
        return events_total(worker.metrics(), "applied")
    except OSError:
        return 0.0


def consume(bootstrap: str, topic: str, want: Callable[[Any], bool], n: int,
            bound_s: float = 30.0) -> list[Any]:
    """Up to `n` records of `topic` (from the beginning) for which `want(msg)` holds."""
    consumer = Consumer(consumer_conf(bootstrap, f"faults-{uuid.uuid4().hex[:8]}"))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        got: list[Any] = []
        deadline = time.monotonic() + bound_s
        while len(got) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error() and want(msg):
                got.append(msg)
        return got
    finally:
        consumer.close()


# --- (b) the broker stopped and restarted ---------------------------------------------------


def _events(prefix: str, n: int) -> list[TransactionEvent]:
    now = datetime.now(UTC)
    return [event(f"{prefix}-{i}", f"{prefix}-u{i % 5}", now, 1.0 + i, "m-1") for i in range(n)]


def test_producer_reports_undelivered_events_or_delivers_after_a_restart(
    kafka_broker: TansuBroker,
) -> None:
    bootstrap = kafka_broker.bootstrap
    kafka_broker.stop()

    # broker down for longer than the delivery timeout: every event is reported, loudly
    lost = _events(f"lost-{uuid.uuid4().hex[:6]}", 25)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="25 of 25 events not delivered") as err:
        with TransactionProducer(bootstrap, delivery_timeout_ms=2000,
                                 request_timeout_ms=1000) as producer:
            for e in lost:
                producer.send(e)
    assert time.monotonic() - t0 < 20
    assert producer.failed == 25 and producer.delivered == 0 and producer.errors
    assert "key=" in str(err.value)

    # broker back within the delivery timeout: the same producer delivers everything
    late = _events(f"late-{uuid.uuid4().hex[:6]}", 25)
    producer = TransactionProducer(bootstrap)
    for e in late:
        producer.send(e)
    time.sleep(1.0)
    kafka_broker.start()
    ensure_topics(bootstrap)
    assert producer.flush(30) == 0, producer.errors
    assert producer.delivered == 25
    ids = {e.transaction_id for e in late}
    got = consume(bootstrap, TRANSACTIONS, lambda m: json.loads(m.value())["transaction_id"]
                  in ids, 25)
    assert {json.loads(m.value())["transaction_id"] for m in got} == ids


def test_produce_cli_exits_non_zero_when_the_broker_dies_mid_run(
    kafka_broker: TansuBroker,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaming.produce", "live", "--rate", "200", "--duration", "4",
         "--bootstrap", kafka_broker.bootstrap, "--flush-timeout-s", "2", "--progress-s", "0.2",
         "--id-prefix", uuid.uuid4().hex[:8]],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first progress line: the run is under way
        assert "events/s" in first, first
        kafka_broker.kill()
        out, errors = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1, first + out + errors
    summary = out.strip().splitlines()[-1]
    assert " not delivered" in summary and ", 0 not delivered" not in summary, summary
    assert "Traceback" not in errors


@pytest.mark.slow
def test_worker_survives_a_broker_restart(
    kafka_broker: TansuBroker, worker_redis: tuple[RedisServer, Any], tmp_path: Path
) -> None:
    _, fs = worker_redis
    worker = Worker(kafka_broker.bootstrap, tmp_path / "recovery", tmp_path / "worker.log")
    run = uuid.uuid4().hex[:8]
    try:
        start_worker(worker, fs)
        # offsets well ahead of what is sent after the restart, on every partition
        before = [event(f"before-{run}-{i}", f"before-{run}-{i % 20}", datetime.now(UTC), 1.0,
                        "m-b") for i in range(80)]
        with TransactionProducer(kafka_broker.bootstrap) as producer:
            for e in before:
                producer.send(e)
        wait_for("the events before the restart",
                 lambda: all(online_velocity(fs, [f"before-{run}-{u}" for u in range(20)])
                             .values()), 30)
        kafka_broker.stop()  # memory storage: back empty, topics and offsets gone
        time.sleep(BROKER_DOWN_S)
        kafka_broker.start()
        ensure_topics(kafka_broker.bootstrap)
        t_restart = time.monotonic()

        # The worker reconnects on its own.  Tansu forgot the log and does not answer
        # OFFSET_OUT_OF_RANGE; the worker's input notices the recreated topics (or offsets past
        # the log's end) and resumes each partition at its start: events sent once, right
        # after the restart, are all served: valid ones online and bad ones in the DLQ.
        users = [f"after-{run}-{i}" for i in range(8)]
        now = datetime.now(UTC)
        events = [event(f"{u}-{j}", u, now - timedelta(minutes=5 - j), 2.0 + j, f"m-{j}")
                  for u in users for j in range(3)]
        with TransactionProducer(kafka_broker.bootstrap) as producer:
            for e in events:
                producer.send(e)
            producer.send_raw(f"bad-{run}", b"not json at all")
        expected = {u: velocity_rows(u, [e for e in events if e.user_id == u])[-1].row
                    for u in users}
        wait_for("the new events' online rows (sent once, after the restart)",
                 lambda: worker.alive() and online_velocity(fs, users) == expected, 60)
        back_after = time.monotonic() - t_restart
        letters = consume(kafka_broker.bootstrap, TRANSACTIONS_DLQ,
                          lambda m: m.key() == f"bad-{run}".encode(), 1)
        assert len(letters) == 1
        assert json.loads(letters[0].value())["reason"].startswith("invalid event")
        assert worker.alive(), worker.log_tail()
        resets = sum(v for (name, _), v in worker.metrics().items()
                     if name == "fraud_stream_offset_resets_total")
        assert resets >= 1  # the lost log was noticed, counted ...
        # ... and logged (the whole log: librdkafka's reconnect lines can fill the tail)
        assert "the log was lost or replaced" in worker.log_path.read_text(errors="replace")
    finally:
        worker.kill()
    print(f"new events served {back_after:.1f} s after the broker restart ({resets:.0f} "
          f"partition offset resets)")


# --- (c) the worker killed repeatedly during a replay --------------------------------------------


@pytest.mark.slow
def test_worker_killed_three_times_matches_the_oracle(
    kafka_broker: TansuBroker, worker_redis: tuple[RedisServer, Any], tmp_path: Path
) -> None:
    _, fs = worker_redis
    rng = random.Random(20261122)
    run = uuid.uuid4().hex[:8]
    users = [f"crash-{run}-{u:02d}" for u in range(30)]
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    events = [
        event(f"{user}-{i}", user, base + timedelta(seconds=2 * i, milliseconds=k),
              round(1.0 + i + k / 100, 2), f"m-{(i * 7 + k) % 11}")
        for i in range(100) for k, user in enumerate(users)
    ]  # 3,000 events, in time order per user
    oracle = {u: velocity_rows(u, [e for e in events if e.user_id == u]) for u in users}
    recovery = tmp_path / "recovery"
    workers: list[Worker] = []

    def new_worker() -> Worker:
        w = Worker(kafka_broker.bootstrap, recovery, tmp_path / f"worker-{len(workers)}.log")
        workers.append(w)
        return w

    def produce(chunk: list[TransactionEvent]) -> threading.Thread:
        """Send `chunk` in the background, ~300 events/s (the worker keeps up with that)."""
        def send() -> None:
            with TransactionProducer(kafka_broker.bootstrap) as producer:
                for i, e in enumerate(chunk, 1):
                    producer.send(e)
                    if i % 30 == 0:
                        producer.poll(0.1)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        return thread

    # four chunks of 750; during each of the first three, SIGKILL once the worker incarnation
    # has applied a random number of events (replays included): a random moment mid-stream
    chunks = [events[i:i + 750] for i in range(0, len(events), 750)]
    kills: list[float] = []
    try:
        start_worker(new_worker(), fs)
        senders = []
        for chunk in chunks[:3]:
            w = workers[-1]
            senders.append(produce(chunk))
            target = rng.randint(50, 700)
            wait_for(f"the worker to apply {target} events", lambda w=w, n=target: applied(w) >= n,
                     WORKER_START_S)
            kills.append(applied(w))
            w.kill()
            new_worker().start()  # same recovery directory: resumes from the last snapshot
        senders.append(produce(chunks[3]))
        for sender in senders:
            sender.join(60)
            assert not sender.is_alive(), "the replay did not finish"
        last = workers[-1]

        def online_complete() -> bool:
            if not last.alive():
                raise AssertionError(f"restarted worker died:\n{last.log_tail()}")
            rows = online_velocity(fs, users)
            return all(rows[u] == oracle[u][-1].row for u in users)

        try:
            wait_for("every user's final online row", online_complete, WORKER_START_S)
        except AssertionError as exc:
            rows = online_velocity(fs, users)
            bad = [u for u in users if rows[u] != oracle[u][-1].row]
            raise AssertionError(f"{exc}: {len(bad)} of {len(users)} users differ from the "
                                 f"oracle (kills at {kills} applied events)") from None
        wanted = {(u, r.row["row_ts_us"]) for u in users for r in oracle[u]}
        hist = wait_for(
            "the history to hold every oracle row",
            lambda: (h := history(set(users)))
            and {(r["user_id"], to_micros(r["event_timestamp"])) for r in h} >= wanted and h,
            30)
    finally:
        for w in workers:
            w.kill()

    # offline: deduplicated by (user, row time), exactly the oracle's rows; duplicates identical
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in hist:
        by_key[(r["user_id"], to_micros(r["event_timestamp"]))].append(
            {"row_ts_us": to_micros(r["event_timestamp"]),
             **{f: list(r[f]) for f in ROW_FIELDS}})
    for key, same in by_key.items():
        assert all(r == same[0] for r in same), f"replayed rows differ for {key}"
    assert {k: v[0] for k, v in by_key.items()} == {
        (u, r.row["row_ts_us"]): r.row for u in users for r in oracle[u]}
    print(f"killed at {kills} applied events; history {len(hist)} rows for "
          f"{len(by_key)} oracle rows ({len(hist) - len(by_key)} identical replays)")


def test_seeder_continues_from_before_a_replayed_event() -> None:
    """The unit behind (c): a row written by a crashed worker, seeded at a replayed event,
    gives back the state before that event, so the replay rebuilds the same rows."""
    from streaming.seeding import row_before

    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    events = [event(f"t{i}", "u", t0 + timedelta(seconds=i), 1.0 + i, f"m{i % 3}")
              for i in range(6)]
    rows = [r.row for r in velocity_rows("u", events)]
    stored = {k: v for k, v in rows[-1].items() if k != "row_ts_us"}
    assert row_before(stored, rows[-1]["row_ts_us"], events[0]) is None  # nothing before it
    for k in range(1, len(events)):
        seed = row_before(stored, rows[-1]["row_ts_us"], events[k])
        assert seed is not None
        state = UserVelocityState.from_row(*seed)
        replayed = [state.apply(e.transaction_id, to_micros(e.event_timestamp), e.amount,
                                e.merchant_id) for e in events[k:]]
        assert replayed == rows[k:]
    later = event("t9", "u", t0 + timedelta(seconds=60), 3.0, "m0")  # not in the row
    assert row_before(stored, rows[-1]["row_ts_us"], later) == (stored, rows[-1]["row_ts_us"])


# --- (d) corrupt or tampered model artifacts ------------------------------------------------


def _rehash(artifact: Path) -> None:
    """Make the metadata's sha256 match the (replaced) model file again."""
    meta = json.loads((artifact / METADATA_FILE).read_text())
    meta["sha256"] = sha256_file(artifact / MODEL_FILE)
    (artifact / METADATA_FILE).write_text(json.dumps(meta))


def _tampered(a: Path) -> None:
    with (a / MODEL_FILE).open("ab") as f:
        f.write(b"\0")


def _garbage(a: Path) -> None:
    (a / MODEL_FILE).write_bytes(b"\x80\x04this is not a pickle")
    _rehash(a)


def _truncated(a: Path) -> None:
    data = (a / MODEL_FILE).read_bytes()
    (a / MODEL_FILE).write_bytes(data[: len(data) // 2])
    _rehash(a)


def _not_a_model(a: Path) -> None:
    joblib.dump({"weights": [1, 2, 3]}, a / MODEL_FILE)
    _rehash(a)


def _evil_pickle(a: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (open, (str(a / "unpickled"), "w"))  # runs only if something unpickles it

    (a / MODEL_FILE).write_bytes(pickle.dumps(Payload()))


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    # name -> (damage, what the error must say besides the file's path)
    "tampered": (_tampered, "refusing to load a modified artifact"),
    "evil_pickle": (_evil_pickle, "refusing to load a modified artifact"),
    "garbage_rehashed": (_garbage, "could not be loaded"),
    "truncated_rehashed": (_truncated, "could not be loaded"),
    "not_a_model_rehashed": (_not_a_model, "no classifier"),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_corrupt_artifact_is_refused_at_start_up_naming_the_file(
    trained_artifact: Path, materialized_store: Any, tmp_path: Path, damage: str
) -> None:
    artifact = clone_artifact(trained_artifact, tmp_path / "models", f"broken-{damage}")
    spoil, message = CORRUPTIONS[damage]
    spoil(artifact)
    settings = ServingSettings(model_dir=artifact.parent, model_version=artifact.name,
                               reload_interval_s=0, allow_unregistered_models=True)
    with pytest.raises(ArtifactError, match=message) as err:
        with TestClient(create_app(settings)):
            pass
    assert str(artifact / MODEL_FILE) in str(err.value)
    assert not (artifact / "unpickled").exists()


def test_registered_hash_is_checked_before_unpickling(
    trained_artifact: Path, materialized_store: Any, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models"
    Registry(model_dir).register(clone_artifact(trained_artifact, model_dir, "swapped"))
    swapped = model_dir / "swapped"
    _evil_pickle(swapped)
    _rehash(swapped)  # consistent with its metadata, not with the registration
    settings = ServingSettings(model_dir=model_dir, model_version=None, reload_interval_s=0)
    with pytest.raises(ArtifactError, match="not the version that was registered"):
        with TestClient(create_app(settings)):
            pass
    assert not (swapped / "unpickled").exists(), "the swapped file was unpickled"


@pytest.mark.parametrize("damage", ["tampered", "garbage_rehashed", "not_a_model_rehashed"])
def test_corrupt_new_version_is_refused_and_the_old_keeps_serving(
    trained_artifact: Path, materialized_store: Any, tmp_path: Path, damage: str
) -> None:
    model_dir = tmp_path / "models"
    registry = Registry(model_dir)
    registry.register(clone_artifact(trained_artifact, model_dir, f"good-{damage}"))
    new = clone_artifact(trained_artifact, model_dir, f"new-{damage}")
    spoil, message = CORRUPTIONS[damage]
    if damage == "tampered":
        registry.register(new)
        spoil(new)  # damaged after registration
    else:
        spoil(new)  # damaged before registration, consistently hashed: only loading shows it
        registry.register(new)
    admin = {"X-API-Key": "faults-admin"}
    settings = ServingSettings(model_dir=model_dir, model_version=None, reload_interval_s=0,
                               admin_api_key="faults-admin")
    body = {"transaction_id": "d-1", "user_id": "d-user", "merchant_id": "d-shop",
            "amount": 10.0, "currency": "EUR", "channel": "online"}
    app = create_app(settings)
    if "/admin/reload" not in app.openapi()["paths"]:
        pytest.skip("the model lifecycle API (/admin/reload) is not there yet")
    with TestClient(app, raise_server_exceptions=False) as client:
        promoted = client.post(f"/admin/promote/new-{damage}", headers=admin)
        assert promoted.status_code == 409, promoted.text
        assert message in promoted.json()["detail"]
        assert str(new) in promoted.json()["detail"]
        assert registry.state()["champion"] == f"good-{damage}"

        # promoted behind this replica's back (MLflow's own API): reload refuses too
        number = registry.state()["versions"][f"new-{damage}"]["mlflow_version"]
        registry.client().set_registered_model_alias(registry.name, "champion", str(number))
        reloaded = client.post("/admin/reload", headers=admin)
        assert reloaded.status_code == 409, reloaded.text
        status = client.get("/admin/models", headers=admin).json()
        assert status["serving"]["champion"]["version"] == f"good-{damage}"
        assert status["last_error"] and str(new) in status["last_error"]
        scored = client.post("/v1/score", json=body)
        assert scored.status_code == 200 and scored.json()["model_version"] == f"good-{damage}"
    assert not (new / "unpickled").exists()
