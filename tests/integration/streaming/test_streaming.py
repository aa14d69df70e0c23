"""The live feature dataflow end to end: Kafka (Tansu) -> worker process -> Redis + history.

The worker is the real `python -m streaming.features` in a subprocess, with its own broker,
recovery directory and metrics port; it inherits the session environment (test data dir,
registry, Redis db 15).  Every test uses fresh user ids (not in the simulated data), checks
the online store through stock `FeatureStore.get_online_features`, and reads the offline
history (the Delta table's `stream` rows) back.  Subprocesses are always killed in `finally`; every wait
is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from devenv.broker import TansuBroker
from devenv.localproc import free_port
from feature_repo import history as offline_history
from feature_repo.contract import TransactionEvent, to_micros
from feature_repo.paths import customers_path, velocity_history_dir
from feature_repo.velocity import ROW_FIELDS, window_features
from scoring.kafka_conf import consumer_conf
from scoring.topics import TRANSACTIONS_DLQ, ensure_topics
from streaming.events import decode_original
from streaming.flow import build_flow
from streaming.producer import TransactionProducer
from streaming.sources import JsonlDeadLetterSink, ParquetLogSource
from streaming.velocity_sink import VelocityRow
from tests.procs import wait_for

PROJECT = Path(__file__).resolve().parents[3]
DOCS = PROJECT / "docs"
START_BOUND_S = 60.0  # worker start-up: Python + Bytewax + Feast registry, ~8 s here
WAIT_BOUND_S = 30.0
SNAPSHOT_S = "0.5"  # short epochs: history files appear quickly, kills land mid-epoch
VELOCITY_FEATURES = [f"user_velocity_fv:{f}" for f in ROW_FIELDS]



# --- helpers ------------------------------------------------------------------------------


def event(txn: str, user: str, ts: datetime, amount: float, merchant: str,
          channel: str = "online") -> TransactionEvent:
    return TransactionEvent(
        transaction_id=txn, user_id=user, merchant_id=merchant, amount=amount,
        currency="EUR", channel=channel, event_timestamp=ts,  # type: ignore[arg-type]
    )


def produce(bootstrap: str, events: list[TransactionEvent]) -> None:
    with TransactionProducer(bootstrap) as producer:
        for e in events:
            producer.send(e)


def history(users: set[str]) -> list[dict[str, Any]]:
    """Offline history rows written by stream workers for `users`."""
    if not offline_history.is_table(velocity_history_dir()):
        return []
    table = offline_history.dataset(velocity_history_dir()).to_table(  # a stock Delta reader
        filter=(ds.field(offline_history.ORIGIN) == offline_history.STREAM) & ds.field("user_id").isin(sorted(users))
    )
    return table.drop_columns([offline_history.ORIGIN]).to_pylist()


def as_velocity_rows(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """History records back into (user_id, VelocityRow.row), sorted by user and time."""
    out = [
        (r["user_id"], {"row_ts_us": to_micros(r["event_timestamp"]),
                        **{f: r[f] for f in ROW_FIELDS}})
        for r in records
    ]
    return sorted(out, key=lambda ur: (ur[0], ur[1]["row_ts_us"]))


def online_rows(store: Any, users: list[str]) -> dict[str, dict[str, Any] | None]:
    """user -> its user_velocity_fv row in the online store (None when absent)."""
    got = store.get_online_features(
        features=VELOCITY_FEATURES, entity_rows=[{"user_id": u} for u in users]
    ).to_dict()
    out: dict[str, dict[str, Any] | None] = {}
    for i, user in enumerate(got["user_id"]):
        row = {f: got[f][i] for f in ROW_FIELDS}
        out[user] = None if row["recent_txn_ts"] is None else row
    return out


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The worker's /metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def events_total(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
    return m.get(("fraud_stream_events_total", (("outcome", outcome),)), 0.0)


class Worker:
    """`python -m streaming.features` as a subprocess on `bootstrap` with `recovery_dir`."""

    def __init__(self, bootstrap: str, recovery_dir: Path, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.bootstrap = bootstrap
        self.recovery_dir = recovery_dir
        self.log_path = log_path
        self.env = env or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        self.port = free_port()
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMING_RECOVERY_DIR": str(self.recovery_dir),
            "STREAMING_METRICS_PORT": str(self.port),
            "STREAMING_SNAPSHOT_INTERVAL_S": SNAPSHOT_S,
            **self.env,
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streaming.features"], cwd=PROJECT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return metrics(self.port)

    def kill(self) -> None:
        """SIGKILL (no shutdown at all) and reap. Idempotent."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def start_ready(worker: Worker, store: Any, name: str) -> None:
    """Start `worker` and wait until a warm-up event reached the online store."""
    worker.start()
    user = f"warm-{name}"
    produce(worker.bootstrap, [event(f"{user}-0", user, datetime.now(UTC), 1.0, "m-warm")])

    def ready() -> bool:
        if not worker.alive():
            raise AssertionError(f"worker exited during start-up:\n{worker.log_tail()}")
        return online_rows(store, [user])[user] is not None

    wait_for("the worker to start", ready, START_BOUND_S)


@pytest.fixture(scope="module")
def live(store: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One broker and one running worker shared by the tests that need no crash."""
    tmp = tmp_path_factory.mktemp("live-worker")
    broker = TansuBroker(log_path=tmp / "tansu.log")
    broker.start()
    worker = Worker(broker.bootstrap, tmp / "recovery", tmp / "worker.log")
    try:
        ensure_topics(broker.bootstrap)
        start_ready(worker, store, uuid.uuid4().hex[:8])
        yield worker
    finally:
        worker.kill()
        broker.stop()


def tag() -> str:
    return uuid.uuid4().hex[:8]


# --- the event contract -------------------------------------------------------------------


def test_committed_json_schema_matches_the_model() -> None:
    committed = json.loads((DOCS / "transaction_event.schema.json").read_text())
    assert committed == TransactionEvent.model_json_schema(), (
        "docs/transaction_event.schema.json is stale: run "
        "`python -m streaming.produce schema > docs/transaction_event.schema.json`"
    )


def test_produce_exits_non_zero_when_events_are_not_delivered() -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "streaming.produce", "live", "--rate", "1000", "--duration",
         "0.05", "--bootstrap", dead, "--flush-timeout-s", "1", "--ready-timeout-s", "1"],
        cwd=PROJECT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "50 not delivered" in proc.stdout
    assert "producer not ready after 1 s" in proc.stderr  # said, then sent anyway


@pytest.mark.integration
def test_produce_cli_replays_the_log_and_simulates_live(
    feature_data: Path, kafka_bootstrap: str, unique_name: str
) -> None:
    topic = f"produce-{unique_name}"  # not `transactions`: no worker should see these
    common = ["--bootstrap", kafka_bootstrap, "--topic", topic, "--progress-s", "0.2"]
    replay = subprocess.run(
        [sys.executable, "-m", "streaming.produce", "replay", "--limit", "300", *common],
        cwd=PROJECT, capture_output=True, text=True, timeout=60,
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "300 delivered, 0 not delivered" in replay.stdout
    live_run = subprocess.run(
        [sys.executable, "-m", "streaming.produce", "live", "--rate", "400", "--duration", "1",
         "--users", "20", "--seed", "5", "--id-prefix", unique_name[-8:], *common],
        cwd=PROJECT, capture_output=True, text=True, timeout=60,
    )
    assert live_run.returncode == 0, live_run.stdout + live_run.stderr
    assert "400 delivered, 0 not delivered" in live_run.stdout
    assert "events/s" in live_run.stdout.splitlines()[0]  # a progress line came first
    assert "live: bank population" in live_run.stderr  # the simulated card holders are there

    consumer = Consumer(consumer_conf(kafka_bootstrap, unique_name))
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    got = []
    try:
        deadline = time.monotonic() + WAIT_BOUND_S
        while len(got) < 700 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                got.append(msg)
    finally:
        consumer.close()
    assert len(got) == 700
    events = [TransactionEvent.model_validate_json(m.value()) for m in got]
    assert all(m.key().decode() == e.user_id for m, e in zip(got, events, strict=True))
    live_prefix = unique_name[-8:]
    replayed = [e for e in events if not e.transaction_id.startswith(live_prefix)]
    by_user = defaultdict(list)
    for e in replayed:
        by_user[e.user_id].append(e.event_timestamp)
    assert len(replayed) == 300
    assert all(ts == sorted(ts) for ts in by_user.values())  # event order within a key
    live = [e for e in events if e.transaction_id.startswith(live_prefix)]
    holders = pq.read_table(customers_path(feature_data), columns=["user_id"])["user_id"]
    assert {e.user_id for e in live} <= set(holders.to_pylist())
    live_ts = sorted(e.event_timestamp for e in live)
    assert len(live_ts) == 400
    # paced over the second (the i-th event is never sent before start + i/rate, even though
    # events due within one 5 ms tick go together), each stamped when sent
    assert (live_ts[-1] - live_ts[0]).total_seconds() >= 0.99


# --- (a) live features -------------------------------------------------------------------


@pytest.mark.integration
def test_live_flow_serves_velocity_features(live: Worker, store: Any) -> None:
    run = tag()
    now = datetime.now(UTC).replace(microsecond=0)
    burst, spread = f"burst-{run}", f"spread-{run}"
    t0 = now - timedelta(minutes=5)
    events = [
        # 3 transactions within 4 minutes at two merchants
        event(f"{run}-b0", burst, t0, 10.0, "m-a"),
        event(f"{run}-b1", burst, t0 + timedelta(minutes=2), 20.5, "m-b"),
        event(f"{run}-b2", burst, t0 + timedelta(minutes=4), 30.25, "m-a"),
        # 4 transactions over 3 hours at four merchants
        event(f"{run}-s0", spread, now - timedelta(hours=3), 100.0, "m-1"),
        event(f"{run}-s1", spread, now - timedelta(minutes=50), 5.0, "m-2"),
        event(f"{run}-s2", spread, now - timedelta(minutes=20), 7.5, "m-3"),
        event(f"{run}-s3", spread, now - timedelta(minutes=2), 12.0, "m-4"),
    ]
    before = live.metrics()
    produce(live.bootstrap, events)

    def both_complete() -> dict[str, dict[str, Any] | None] | None:
        rows = online_rows(store, [burst, spread])
        lengths = [len(r["recent_txn_ts"]) if r else 0 for r in rows.values()]
        return rows if lengths == [3, 4] else None

    rows = wait_for("both users' online rows", both_complete)
    b, s = rows[burst], rows[spread]
    assert b is not None and s is not None

    def feats(row: dict[str, Any], at: datetime, merchant: str) -> dict[str, Any]:
        return window_features(*(row[f] for f in ROW_FIELDS), to_micros(at), merchant)

    last_b = t0 + timedelta(minutes=4)
    assert feats(b, last_b + timedelta(seconds=1), "m-a") == {
        "user_txn_count_10m": 3,
        "user_txn_count_1h": 3,
        "user_amount_sum_1h": 60.75,
        "user_distinct_merchants_24h": 2,
        "user_seconds_since_last_txn": 1.0,
        "user_is_new_merchant": 0,
    }
    # 10 min + 1 s after the first: it left the 10-minute window, not the hour
    later = feats(b, t0 + timedelta(minutes=10, seconds=1), "m-new")
    assert later["user_txn_count_10m"] == 2 and later["user_txn_count_1h"] == 3
    assert later["user_seconds_since_last_txn"] == 361.0 and later["user_is_new_merchant"] == 1
    # the transaction itself does not count
    assert feats(b, last_b, "m-a")["user_txn_count_10m"] == 2
    assert feats(s, now - timedelta(minutes=2) + timedelta(seconds=1), "m-2") == {
        "user_txn_count_10m": 1,
        "user_txn_count_1h": 3,
        "user_amount_sum_1h": 24.5,
        "user_distinct_merchants_24h": 4,
        "user_seconds_since_last_txn": 1.0,
        "user_is_new_merchant": 0,
    }

    # Feast's own on-demand view over the streamed row gives the same answer
    at = last_b + timedelta(seconds=1)
    odfv = store.get_online_features(
        features=["user_velocity_odfv:user_txn_count_10m", "user_velocity_odfv:user_amount_sum_1h"],
        entity_rows=[{"user_id": burst, "request_ts_us": to_micros(at), "txn_amount": 1.0,
                      "txn_merchant_id": "m-a", "txn_channel": "online"}],
    ).to_dict()
    assert odfv["user_txn_count_10m"] == [3] and odfv["user_amount_sum_1h"] == [60.75]

    # offline history: one row per event, newest event last
    hist = wait_for("history rows", lambda: (h := history({burst, spread})) and len(h) == 7 and h)
    newest = sorted((r["user_id"], r["recent_txn_ts"][-1]) for r in hist)
    assert newest == sorted((e.user_id, to_micros(e.event_timestamp)) for e in events)

    m = live.metrics()
    assert events_total(m, "applied") >= len(events) + 1  # + the warm-up event
    count = ("fraud_stream_freshness_seconds_count", ())
    total = ("fraud_stream_freshness_seconds_sum", ())
    assert m[count] > before[count]
    print(f"freshness: {(m[total] - before[total]) / (m[count] - before[count]):.3f} s mean over "
          f"{m[count] - before[count]:.0f} online writes")
    assert m[("fraud_stream_rows_written_total", (("store", "online"),))] > 0


# --- (b) dead letters, duplicates ---------------------------------------------------------


def _valid(run: str, user: str, **changes: Any) -> dict[str, Any]:
    body = {"schema_version": 1, "transaction_id": f"{run}-{user}", "user_id": user,
            "merchant_id": "m-x", "amount": 12.5, "currency": "EUR", "channel": "online",
            "event_timestamp": datetime.now(UTC).isoformat()}
    for key, value in changes.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return body


@pytest.mark.integration
def test_bad_events_go_to_the_dlq_and_the_worker_keeps_going(
    live: Worker, store: Any, unique_name: str
) -> None:
    run = tag()
    late_user, dup_user, canary = f"late-{run}", f"dup-{run}", f"canary-{run}"
    now = datetime.now(UTC)
    bad: dict[str, tuple[bytes, str]] = {  # kind -> (value, substring of the reason)
        "not_json": (b"this is not json", "Invalid JSON"),
        "version": (json.dumps(_valid(run, "v", schema_version=2)).encode(), "schema_version"),
        "missing": (json.dumps(_valid(run, "m", amount=...)).encode(), "amount: Field required"),
        "types": (json.dumps(_valid(run, "t", amount="lots", user_id=7)).encode(), "user_id"),
        "negative": (json.dumps(_valid(run, "n", amount=-5)).encode(), "greater than 0"),
        "nan": (json.dumps(_valid(run, "nan", amount=float("nan"))).encode(), "finite"),
        "naive": (json.dumps(_valid(run, "z", event_timestamp="2026-11-01T10:00:00")).encode(),
                  "timezone-aware"),
        "channel": (json.dumps(_valid(run, "c", channel="teleport")).encode(), "channel"),
        "utf8": (json.dumps(_valid(run, "UTF")).encode().replace(b"UTF", b"\xff\xfe"),
                 "invalid event"),
        "extra": (json.dumps(_valid(run, "x", fraud=True)).encode(), "fraud: Extra inputs"),
    }
    keys = {kind: f"bad-{kind}-{run}" for kind in bad}
    first = event(f"{run}-d0", dup_user, now - timedelta(seconds=30), 10.0, "m-1")
    with TransactionProducer(live.bootstrap) as producer:
        for kind, (value, _) in bad.items():
            producer.send_raw(keys[kind], value)
        producer.send(event(f"{run}-l0", late_user, now, 5.0, "m-1"))
        producer.send(event(f"{run}-l1", late_user, now - timedelta(hours=1), 6.0, "m-1"))
        producer.send(first)
        producer.send(first)  # exact duplicate
        producer.send(first.model_copy(update={"amount": 99.0}))  # same id, other content
        producer.send(event(f"{run}-d1", dup_user, now, 11.0, "m-2"))
        producer.send(event(f"{run}-c0", canary, now, 1.0, "m-1"))  # after all the bad ones

    consumer = Consumer(consumer_conf(live.bootstrap, unique_name))
    consumer.subscribe([TRANSACTIONS_DLQ])
    wanted = {k.encode() for k in keys.values()} | {late_user.encode()}
    letters: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
    try:
        deadline = time.monotonic() + WAIT_BOUND_S
        while not wanted <= set(letters) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() or msg.key() not in wanted:
                continue
            body = json.loads(msg.value())
            headers = dict(msg.headers() or [])
            assert headers["reason"].decode() == body["reason"][:200]
            letters[msg.key()].append(body)
    finally:
        consumer.close()
    assert set(letters) == wanted, f"missing dead letters: {wanted - set(letters)}"
    for kind, (value, reason) in bad.items():
        (letter,) = letters[keys[kind].encode()]
        assert reason in letter["reason"], (kind, letter["reason"])
        assert decode_original(letter) == value  # nothing lost (not UTF-8: base64)
        assert letter["size"] == len(value) and letter["truncated"] is False
        assert letter["topic"] == "transactions" and letter["partition"] in range(4)
        assert isinstance(letter["offset"], int)  # where the original is in the topic
    (late,) = letters[late_user.encode()]
    assert late["reason"].startswith("late:")
    assert json.loads(late["original"])["transaction_id"] == f"{run}-l1"

    rows = wait_for(
        "the canary and duplicate users' rows",
        lambda: (r := online_rows(store, [canary, dup_user]))[canary] and r[dup_user]
        and len(r[dup_user]["recent_txn_ts"]) == 2 and r,  # type: ignore[index]
    )
    dup_row = rows[dup_user]
    assert dup_row is not None
    assert dup_row["recent_txn_ts"] == [to_micros(first.event_timestamp), to_micros(now)]
    assert dup_row["recent_amounts"] == [10.0, 11.0]  # the first version of the id won
    hist = wait_for("history", lambda: (h := history({dup_user, late_user})) and len(h) == 3 and h)
    assert Counter(r["user_id"] for r in hist) == {dup_user: 2, late_user: 1}
    assert live.alive(), live.log_tail()
    m = live.metrics()
    assert events_total(m, "invalid") >= len(bad)
    assert events_total(m, "late") >= 1 and events_total(m, "duplicate") >= 2


# --- (d) one flow, three sources ------------------------------------------------------------


@pytest.mark.integration
def test_kafka_list_and_log_sources_give_identical_rows(
    live: Worker, tmp_path: Path
) -> None:
    run = tag()
    now = datetime.now(UTC)
    users = [f"same-{run}-{i}" for i in range(3)]
    events: list[TransactionEvent] = []
    for i, user in enumerate(users):
        base = now - timedelta(hours=2, minutes=i)
        for j in range(5):
            events.append(event(f"{user}-{j}", user, base + timedelta(minutes=17 * j),
                                round(3.5 + 7.25 * j + i, 2), f"m-{(i + j) % 3}"))
    # out of order within the allowed lateness, and a duplicate id
    events.append(event(f"{users[0]}-ooo", users[0], now - timedelta(minutes=58),
                        8.0, "m-9"))
    events.append(events[1])
    expected_rows = len(events) - 1

    produce(live.bootstrap, events)
    kafka_rows = as_velocity_rows(wait_for(
        "the stream's history rows",
        lambda: (h := history(set(users))) and len(h) == expected_rows and h,
    ))

    list_rows: list[tuple[str, VelocityRow]] = []
    dead: list[Any] = []
    dicts = [e.model_dump() for e in events]
    run_main(build_flow(TestingSource(dicts), TestingSink(list_rows), TestingSink(dead)))
    assert dead == []

    log_dir = tmp_path / "log" / f"date={now:%Y-%m-%d}"
    log_dir.mkdir(parents=True)
    table = pa.Table.from_pylist(
        [{k: v for k, v in d.items() if k != "schema_version"} for d in dicts]
    ).cast(pa.schema([
        ("transaction_id", pa.string()), ("user_id", pa.string()), ("merchant_id", pa.string()),
        ("amount", pa.float64()), ("currency", pa.string()), ("channel", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ]))
    pq.write_table(table, log_dir / "part-0.parquet")
    log_rows: list[tuple[str, VelocityRow]] = []
    run_main(build_flow(ParquetLogSource(tmp_path / "log"), TestingSink(log_rows),
                        JsonlDeadLetterSink(tmp_path / "dlq")))

    def plain(rows: list[tuple[str, VelocityRow]]) -> list[tuple[str, dict[str, Any]]]:
        return sorted(((u, r.row) for u, r in rows), key=lambda ur: (ur[0], ur[1]["row_ts_us"]))

    assert len(kafka_rows) == expected_rows
    assert plain(list_rows) == kafka_rows
    assert plain(log_rows) == kafka_rows


# --- (c) crash and recovery -------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("restart_shards", [None, "0"], ids=["same-layout", "layout-changed"])
def test_worker_killed_mid_stream_loses_nothing_and_counts_nothing_twice(
    kafka_broker: TansuBroker, store: Any, tmp_path: Path, restart_shards: str | None
) -> None:
    """SIGKILL mid-epoch, then a restart on the same recovery directory; "layout-changed"
    restarts with one state key per user instead of shards (`STREAMING_STATE_SHARDS=0`), so the
    snapshot holds no state for the new layout: every user is seeded from the online store
    while the input resumes from the snapshot's offsets."""
    run = tag()
    users = [f"kill-{run}-{u:02d}" for u in range(30)]
    rounds, round_s = 100, 0.04  # 3,000 events over ~4 s, ~750 events/s
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    recovery = tmp_path / "recovery"
    first = Worker(kafka_broker.bootstrap, recovery, tmp_path / "worker-1.log")
    second = Worker(kafka_broker.bootstrap, recovery, tmp_path / "worker-2.log",
                    env={"STREAMING_STATE_SHARDS": restart_shards} if restart_shards else None)
    oracle_ts: dict[str, list[int]] = defaultdict(list)
    oracle_amounts: dict[str, list[float]] = defaultdict(list)
    try:
        start_ready(first, store, run)
        killed_in_round, applied_at_kill = None, 0.0
        producer = TransactionProducer(kafka_broker.bootstrap)
        t_start = time.monotonic()
        for i in range(rounds):
            ts = base + timedelta(seconds=10 * i)
            for k, user in enumerate(users):
                amount = float(i) + k / 100 + 0.5
                producer.send(event(f"{user}-{i}", user, ts, amount, f"m-{(i + k) % 7}"))
                oracle_ts[user].append(to_micros(ts))
                oracle_amounts[user].append(amount)
            while (left := t_start + (i + 1) * round_s - time.monotonic()) > 0:
                producer.poll(left)
            if killed_in_round is None and (
                (i >= 10 and i % 5 == 0 and history(set(users)))
                # half the events sent and no history yet (slow machine): wait, keep the rest
                or (i == rounds // 2 and wait_for("first history rows",
                                                  lambda: history(set(users))))
            ):
                applied_at_kill = events_total(first.metrics(), "applied")
                first.kill()  # SIGKILL after some rows reached the history, mid-epoch
                killed_in_round = i
        assert producer.flush(30) == 0, producer.errors
        assert killed_in_round is not None and killed_in_round <= rounds // 2

        second.start()  # same recovery directory: resumes from the last snapshot

        def online_complete() -> bool:
            if not second.alive():
                raise AssertionError(f"restarted worker died:\n{second.log_tail()}")
            rows = online_rows(store, users)
            return all(
                r is not None and r["recent_txn_ts"] == oracle_ts[u] for u, r in rows.items()
            )

        wait_for("every user's final online row", online_complete, START_BOUND_S)
        produced = {(u, t) for u, tss in oracle_ts.items() for t in tss}
        hist = wait_for(
            "the history to cover every event",
            lambda: (h := history(set(users)))
            and {(r["user_id"], r["recent_txn_ts"][-1]) for r in h} >= produced and h,
        )
        applied_after_restart = events_total(second.metrics(), "applied")
    finally:
        first.kill()
        second.kill()

    # online: the newest row of each user has exactly its events, each once
    final = online_rows(store, users)
    for user in users:
        row = final[user]
        assert row is not None
        assert row["recent_txn_ts"] == oracle_ts[user]
        assert row["recent_amounts"] == oracle_amounts[user]
    # the restart resumed from a snapshot instead of re-reading the topic from the start
    assert 0 < applied_after_restart < len(produced), applied_after_restart

    # offline: replays rewrite identical rows; deduplicated, every event is newest exactly once
    by_key: dict[tuple[str, datetime], list[dict[str, Any]]] = defaultdict(list)
    for r in hist:
        by_key[(r["user_id"], r["event_timestamp"])].append(r)
    for key, same in by_key.items():
        assert all(r == same[0] for r in same), f"replayed row differs for {key}"
    newest = Counter((u, rows[0]["recent_txn_ts"][-1]) for (u, _), rows in by_key.items())
    assert set(newest) == produced and set(newest.values()) == {1}
    assert len(by_key) == len(produced)
    print(f"killed after round {killed_in_round}/{rounds} ({applied_at_kill:.0f} events applied); "
          f"restart applied {applied_after_restart:.0f}; history {len(hist)} rows, "
          f"{len(hist) - len(by_key)} identical replays")
