"""The feature dataflow against hostile input: poison records, future timestamps, a DLQ that is
down, a lost log.

What must hold (docs/operations.md, "Dead letters", "Future events", "Broker restart"): any
record, of any size and bytes, ends in the DLQ in a bounded form or is counted as lost; the worker
keeps going; an event far ahead of the clock never reaches a user's state; a partition whose
log was lost resumes by the documented policy.  Live tests run the real worker on a private
Tansu broker and the session's Redis; every wait is bounded and every address is 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from devenv.broker import TansuBroker
from devenv.localproc import free_port
from feature_repo import history as offline_history
from feature_repo.contract import DEFAULT_MAX_FUTURE_SECONDS, TransactionEvent, to_micros
from feature_repo.velocity import ALLOWED_LATENESS_US
from scoring.kafka_conf import consumer_conf
from scoring.topics import TRANSACTIONS, TRANSACTIONS_DLQ
from streaming.backfill import backfill
from streaming.config import StreamingSettings
from streaming.events import MAX_ORIGINAL_BYTES, DeadLetter, decode_original
from streaming.flow import build_flow
from streaming.kafka_input import KafkaInput
from streaming.producer import TransactionProducer
from streaming.sources import KafkaDeadLetterSink, read_dead_letters
from streaming.velocity_sink import VelocityRow
from tests.integration.streaming.test_streaming import (
    START_BOUND_S,
    Worker,
    _valid,
    as_velocity_rows,
    event,
    events_total,
    history,
    online_rows,
    start_ready,
    wait_for,
)

NOW_SLACK_S = 60  # the "real" events of the attacks lie this far before now, at most


def _counter(name: str, **labels: str) -> float:
    return float(REGISTRY.get_sample_value(name, labels) or 0.0)


def _body(txn: str, user: str, **changes: Any) -> dict[str, Any]:
    """`_valid` of test_streaming under the transaction id `txn`."""
    return {**_valid("-", user, **changes), "transaction_id": txn}


def dlq_letters(bootstrap: str, keys: set[bytes], bound_s: float = 30.0
                ) -> dict[bytes, list[dict[str, Any]]]:
    """Dead letters on `bootstrap` whose key is in `keys`, read from the start of the topic."""
    consumer = Consumer(consumer_conf(bootstrap, f"safety-{uuid.uuid4().hex[:8]}"))
    consumer.assign([TopicPartition(TRANSACTIONS_DLQ, 0, 0)])
    got: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
    sizes: dict[bytes, int] = {}
    try:
        deadline = time.monotonic() + bound_s
        while not keys <= set(got) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() or msg.key() not in keys:
                continue
            got[msg.key()].append(json.loads(msg.value()))
            sizes[msg.key()] = max(sizes.get(msg.key(), 0), len(msg.value()))
    finally:
        consumer.close()
    for key, letters in got.items():
        for letter in letters:
            letter["_bytes"] = sizes[key]
    return got


# --- bounded dead letters (unit) -------------------------------------------------------------


def test_a_dead_letter_is_bounded_whatever_its_original() -> None:
    poison = DeadLetter("invalid event: x", b"\xff" * 300_000, b"k", (TRANSACTIONS, 2, 41))
    out = json.loads(raw := poison.to_json())
    assert len(raw) < 100_000  # not the 1.8 MB of 300,000 escaped U+FFFD
    assert out["encoding"] == "base64" and out["truncated"] is True and out["size"] == 300_000
    assert decode_original(out) == b"\xff" * MAX_ORIGINAL_BYTES
    assert (out["topic"], out["partition"], out["offset"]) == (TRANSACTIONS, 2, 41)

    big = json.dumps(_body("t", "u", merchant_id="m" * 1_200_000)).encode()
    out = json.loads(raw := DeadLetter("invalid event: y", big).to_json())
    assert len(raw) < MAX_ORIGINAL_BYTES + 2_000 and out["encoding"] == "utf-8"
    assert out["original"] == big[:MAX_ORIGINAL_BYTES].decode() and out["size"] == len(big)
    assert out["topic"] is None and out["offset"] is None

    controls = DeadLetter("unparseable event: z" * 1000, b"\x01" * 500_000)  # 6x when escaped
    raw = controls.to_json()
    assert len(raw) < 6 * MAX_ORIGINAL_BYTES + 2_000
    assert len(json.loads(raw)["reason"]) == 1000

    # a cut through a multi-byte character keeps the text, minus that character
    text = ("é" * MAX_ORIGINAL_BYTES).encode()
    out = json.loads(DeadLetter("r", text).to_json())
    assert out["encoding"] == "utf-8" and out["original"] == "é" * (MAX_ORIGINAL_BYTES // 2)
    # small non-UTF-8 originals are kept exactly
    out = json.loads(DeadLetter("r", b"ab\xffcd").to_json())
    assert out["encoding"] == "base64" and base64.b64decode(out["original"]) == b"ab\xffcd"
    assert out["truncated"] is False


# --- the future bound (unit, in-memory flow) ---------------------------------------------------


def test_default_future_bound_is_below_the_allowed_lateness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the newest event of a user at most `max_future_seconds` ahead of real time, events
    of now are within the lateness window behind it: a future event cannot get real ones
    refused as late."""
    monkeypatch.delenv("FRAUD_MAX_FUTURE_SECONDS", raising=False)
    assert StreamingSettings().max_future_seconds == DEFAULT_MAX_FUTURE_SECONDS
    assert DEFAULT_MAX_FUTURE_SECONDS * 1_000_000 + NOW_SLACK_S * 1_000_000 < ALLOWED_LATENESS_US
    monkeypatch.setenv("FRAUD_MAX_FUTURE_SECONDS", "42")
    assert StreamingSettings().max_future_seconds == 42.0


def attack(run: str) -> tuple[list[TransactionEvent], str, str]:
    """One event of a user two hours ahead, then five real ones of now; another user's event
    in the year 2999, then a real one."""
    now = datetime.now(UTC).replace(microsecond=0)
    victim, other = f"victim-{run}", f"y2999-{run}"
    events = [event(f"{victim}-f", victim, now + timedelta(hours=2), 1.0, "m-f")]
    events += [event(f"{victim}-{j}", victim, now - timedelta(seconds=50 - 10 * j), 10.0 + j,
                     f"m-{j}") for j in range(5)]
    events.append(event(f"{other}-f", other, datetime(2999, 1, 1, tzinfo=UTC), 2.0, "m-f"))
    events.append(event(f"{other}-0", other, now, 3.0, "m-0"))
    return events, victim, other


def test_future_events_never_reach_the_state_in_memory() -> None:
    events, victim, other = attack(uuid.uuid4().hex[:8])
    rows: list[tuple[str, VelocityRow]] = []
    dead: list[DeadLetter] = []
    before = _counter("fraud_stream_events_total", outcome="future")
    run_main(build_flow(TestingSource([e.model_dump() for e in events]), TestingSink(rows),
                        TestingSink(dead), max_future_s=300))
    assert sorted(d.reason.split(":")[0] for d in dead) == ["future", "future"]
    assert {json.loads(d.original)["transaction_id"] for d in dead} == {f"{victim}-f",
                                                                       f"{other}-f"}
    last = {u: r.row for u, r in rows}
    assert last[victim]["recent_txn_ts"] == [to_micros(e.event_timestamp) for e in events[1:6]]
    assert last[other]["recent_txn_ts"] == [to_micros(events[-1].event_timestamp)]
    assert _counter("fraud_stream_events_total", outcome="future") == before + 2


def test_stringly_amounts_and_epoch_timestamps_are_dead_letters_in_memory() -> None:
    items = [json.dumps(_body("s", "u-s", amount="12.5")).encode(),
             json.dumps(_body("e", "u-e", event_timestamp=int(time.time()))).encode(),
             _body("e2", "u-e", event_timestamp=time.time()),
             json.dumps(_body("e3", "u-e", event_timestamp=str(int(time.time())))).encode(),
             json.dumps(_body("e4", "u-e", event_timestamp=str(int(time.time() * 1000))))
             .encode()]
    rows: list[Any] = []
    dead: list[DeadLetter] = []
    run_main(build_flow(TestingSource(items), TestingSink(rows), TestingSink(dead)))
    assert rows == [] and len(dead) == 5
    assert "amount" in dead[0].reason
    assert all("event_timestamp" in d.reason for d in dead[1:])
    assert all(d.reason.startswith("invalid event:") for d in dead)


# --- a DLQ that is down (unit, nothing listening) ----------------------------------------------


def test_dlq_down_is_retried_for_a_bounded_time_then_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead_port = f"127.0.0.1:{free_port()}"  # nothing listens there
    part = KafkaDeadLetterSink(dead_port, TRANSACTIONS_DLQ, retry_s=2.0).build("dlq", 0, 1)
    letter = DeadLetter("invalid event: x", b"\xff" * 300_000, b"key-1", (TRANSACTIONS, 3, 77))
    before = _counter("fraud_stream_dlq_failed_total", reason="invalid event")
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="streaming.sources"):
        part.write_batch([letter])  # returns, never raises
    took = time.monotonic() - t0
    try:
        assert 2.0 <= took < 8.0, took  # retried for its budget, not forever
        assert _counter("fraud_stream_dlq_failed_total", reason="invalid event") == before + 1
        (record,) = [r for r in caplog.records if "dead letter not written" in r.getMessage()]
        assert "partition=3 offset=77" in record.getMessage() and "b'key-1'" in record.getMessage()
        assert "s of retries" in record.getMessage(), record.getMessage()  # not "sink error"
    finally:
        part.close()


@pytest.mark.integration
def test_a_letter_refused_for_its_size_is_resent_without_its_original_else_counted(
    kafka_broker: TansuBroker, caplog: pytest.LogCaptureFixture,
) -> None:
    """A letter the producer or broker refuses for itself (MSG_SIZE_TOO_LARGE: the crash of
    issue 15) is sent once more without its original; one refused even so is counted, logged
    and skipped.  The refusal is provoked by the producer's own record limit."""
    from confluent_kafka import Producer

    run = uuid.uuid4().hex[:8]
    part = KafkaDeadLetterSink(kafka_broker.bootstrap, TRANSACTIONS_DLQ, retry_s=5.0).build(
        "dlq", 0, 1)
    try:
        conf = part._conf  # noqa: SLF001 - the sink's own producer settings
        part._producer = Producer({**conf, "message.max.bytes": 10_000})  # noqa: SLF001
        big = DeadLetter("invalid event: big", b"\xff" * 300_000, f"big-{run}".encode(),
                         (TRANSACTIONS, 1, 5))
        assert len(big.to_json()) > 10_000  # refused with its original, taken without
        failed = _counter("fraud_stream_dlq_failed_total", reason="invalid event")
        part.write_batch([big])
        (letter,) = dlq_letters(kafka_broker.bootstrap, {big.key})[big.key]
        assert letter["original"] == "" and letter["truncated"] is True
        assert (letter["size"], letter["reason"]) == (300_000, "invalid event: big")
        assert (letter["topic"], letter["partition"], letter["offset"]) == (TRANSACTIONS, 1, 5)
        assert _counter("fraud_stream_dlq_failed_total", reason="invalid event") == failed

        part._producer = Producer({**conf, "message.max.bytes": 1_000})  # noqa: SLF001
        worse = DeadLetter("invalid event: " + "r" * 2_000, b"x", f"worse-{run}".encode(),
                           (TRANSACTIONS, 2, 9))
        with caplog.at_level(logging.ERROR, logger="streaming.sources"):
            part.write_batch([worse])  # even bare over the limit: counted, logged, skipped
        assert _counter("fraud_stream_dlq_failed_total", reason="invalid event") == failed + 1
        assert any("dead letter not written" in r.getMessage() and "partition=2 offset=9"
                   in r.getMessage() for r in caplog.records)
    finally:
        part.close()


# --- live: poison records and future events on the real worker --------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_poison_records_go_to_the_dlq_bounded_and_the_worker_keeps_going(
    kafka_broker: TansuBroker, store: Any, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    users = [f"good-{run}-{i}" for i in range(4)]
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    good = [[event(f"{u}-{j}", u, base + timedelta(seconds=j), 1.0 + j, "m-1") for u in users]
            for j in range(24)]  # 24 rounds: a good event of each user between bad ones
    big = json.dumps(_body(f"{run}-big", "big", note="x" * 1_200_000)).encode()
    bad: dict[str, tuple[bytes, str]] = {  # key -> (value, reason prefix)
        f"ff-{run}": (b"\xff" * 300_000, "invalid event"),
        f"big-{run}": (big, "invalid event"),
        f"str-{run}": (json.dumps(_body(f"{run}-s", "s", amount="12.5")).encode(),
                       "invalid event"),
        f"epoch-{run}": (json.dumps(_body(f"{run}-e", "e", event_timestamp=1_790_000_000))
                         .encode(), "invalid event"),
        f"future-{run}": (json.dumps(_body(f"{run}-f", "f", event_timestamp=(
            datetime.now(UTC) + timedelta(hours=2)).isoformat())).encode(), "future"),
        f"y2999-{run}": (json.dumps(_body(f"{run}-y", "y", event_timestamp="2999-01-01T00:00Z"))
                         .encode(), "future"),
        f"empty-{run}": (b"", "invalid event"),
        f"nul-{run}": (b"\x00" * 1000, "invalid event"),
        f"array-{run}": (b"[1, 2, 3]", "invalid event"),
        f"deep-{run}": (b"[" * 100_000 + b"]" * 100_000, "invalid event"),
        f"nan-{run}": (json.dumps(_body(f"{run}-n", "n", amount=float("nan"))).encode(),
                       "invalid event"),
        f"bool-{run}": (json.dumps(_body(f"{run}-b", "b", amount=True)).encode(), "invalid event"),
        f"huge-{run}": (json.dumps(_body(f"{run}-h", "h", amount=1e300)).encode(), "invalid event"),
        f"id-{run}": (json.dumps(_body("x" * 65, "i")).encode(), "invalid event"),
        f"null-{run}": (json.dumps(_body(f"{run}-0", None)).encode(), "invalid event"),
        f"v2-{run}": (json.dumps(_body(f"{run}-2", "v", schema_version=2)).encode(),
                      "invalid event"),
        f"naive-{run}": (json.dumps(_body(f"{run}-z", "z", event_timestamp="2026-11-01T10:00"))
                         .encode(), "invalid event"),
        f"y10k-{run}": (json.dumps(_body(f"{run}-k", "k", event_timestamp="9999-12-31T23:59-01:00"))
                        .encode(), "invalid event"),
        f"utf16-{run}": (json.dumps(_body(f"{run}-u", "u")).encode("utf-16"), "invalid event"),
        f"trunc-{run}": (json.dumps(_body(f"{run}-t", "t")).encode()[:40], "invalid event"),
    }
    assert len(bad) == 20
    recovery = tmp_path / "recovery"
    first = Worker(kafka_broker.bootstrap, recovery, tmp_path / "worker-1.log")
    second = Worker(kafka_broker.bootstrap, recovery, tmp_path / "worker-2.log")
    try:
        start_ready(first, store, run)
        # The 1.2 MB record needs a producer allowing it (librdkafka's default limit is 1 MB;
        # Tansu takes records of several MB)
        with TransactionProducer(kafka_broker.bootstrap, message_max_bytes=5_000_000) as producer:
            for j, (key, (value, _)) in enumerate(bad.items()):
                for e in good[j]:
                    producer.send(e)
                producer.send_raw(key, value)
            for e in good[20]:
                producer.send(e)

        def online(n: int, w: Worker = first) -> bool:
            if not w.alive():
                raise AssertionError(f"worker died:\n{w.log_tail()}")
            rows = online_rows(store, users)
            return all(r is not None and len(r["recent_txn_ts"]) == n for r in rows.values())

        wait_for("the good events' online rows", lambda: online(21), 60)
        letters = dlq_letters(kafka_broker.bootstrap, {k.encode() for k in bad})
        assert set(letters) == {k.encode() for k in bad}, set(bad) - {k.decode() for k in letters}
        for key, (value, reason) in bad.items():
            letter = letters[key.encode()][0]
            assert letter["reason"].startswith(reason), (key, letter["reason"])
            assert letter["_bytes"] < 6 * MAX_ORIGINAL_BYTES + 2_000, key
            assert letter["size"] == len(value) and letter["topic"] == TRANSACTIONS
            assert letter["truncated"] is (len(value) > MAX_ORIGINAL_BYTES)
            assert decode_original(letter) == value[:MAX_ORIGINAL_BYTES] or (
                letter["encoding"] == "utf-8" and value[:MAX_ORIGINAL_BYTES].startswith(
                    decode_original(letter)))
        assert letters[f"ff-{run}".encode()][0]["encoding"] == "base64"
        m = first.metrics()
        assert m.get(("fraud_stream_dlq_failed_total", (("reason", "invalid event"),)), 0) == 0
        assert events_total(m, "future") >= 2

        # a restart (SIGKILL, same recovery directory) replays from the last snapshot: nothing
        # is applied twice, and the rounds sent after it count once each
        first.kill()
        second.start()
        produce_rounds = [e for j in (21, 22, 23) for e in good[j]]
        with TransactionProducer(kafka_broker.bootstrap) as producer:
            for e in produce_rounds:
                producer.send(e)
        wait_for("the rounds after the restart", lambda: online(24, second),
                 START_BOUND_S)
        rows = online_rows(store, users)
        for i, u in enumerate(users):
            row = rows[u]
            assert row is not None
            assert row["recent_txn_ts"] == [to_micros(good[j][i].event_timestamp)
                                            for j in range(24)]
        assert second.alive(), second.log_tail()
    finally:
        first.kill()
        second.kill()


def _write_log(root: Path, events: list[TransactionEvent]) -> None:
    day = root / "transactions" / f"date={datetime.now(UTC):%Y-%m-%d}"
    day.mkdir(parents=True)
    table = pa.Table.from_pylist(
        [{k: v for k, v in e.model_dump().items() if k != "schema_version"} for e in events]
    ).cast(pa.schema([
        ("transaction_id", pa.string()), ("user_id", pa.string()), ("merchant_id", pa.string()),
        ("amount", pa.float64()), ("currency", pa.string()), ("channel", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ]))
    pq.write_table(table, day / "part-0.parquet")


@pytest.mark.integration
@pytest.mark.slow
def test_future_timestamp_attack_live_and_in_the_backfill(
    kafka_broker: TansuBroker, store: Any, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    events, victim, other = attack(run)
    worker = Worker(kafka_broker.bootstrap, tmp_path / "recovery", tmp_path / "worker.log")
    try:
        start_ready(worker, store, run)
        with TransactionProducer(kafka_broker.bootstrap) as producer:
            for e in events:
                producer.send(e)

        def both_online() -> dict[str, Any] | None:
            if not worker.alive():
                raise AssertionError(f"worker died:\n{worker.log_tail()}")
            rows = online_rows(store, [victim, other])
            done = [len(r["recent_txn_ts"]) if r else 0 for r in rows.values()] == [5, 1]
            return rows if done else None

        rows = wait_for("the real events online", both_online)
        letters = dlq_letters(kafka_broker.bootstrap, {victim.encode(), other.encode()})
        stream_rows = as_velocity_rows(wait_for(
            "the stream's history", lambda: (h := history({victim, other})) and len(h) == 6 and h))
        future = events_total(worker.metrics(), "future")
    finally:
        worker.kill()
    assert rows[victim]["recent_txn_ts"] == [to_micros(e.event_timestamp) for e in events[1:6]]
    assert rows[victim]["recent_amounts"] == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert rows[other]["recent_txn_ts"] == [to_micros(events[-1].event_timestamp)]
    for user, txn in ((victim, f"{victim}-f"), (other, f"{other}-f")):
        (letter,) = letters[user.encode()]
        assert letter["reason"].startswith("future:"), letter["reason"]
        assert json.loads(letter["original"])["transaction_id"] == txn
    assert future >= 2

    # the backfill replays the same events from a log through the same flow: same rows
    _write_log(tmp_path / "data", events)
    backfill(tmp_path / "data")
    table = offline_history.read(tmp_path / "data" / "features" / "user_velocity").to_pylist()
    assert {r.pop(offline_history.ORIGIN) for r in table} == {offline_history.BACKFILL}
    assert as_velocity_rows([r for r in table if r["user_id"] in (victim, other)]) == stream_rows
    dead = read_dead_letters(tmp_path / "data" / "dlq" / "backfill.*.jsonl")
    assert sorted(json.loads(d["original"])["transaction_id"] for d in dead) == sorted(
        [f"{victim}-f", f"{other}-f"])
    assert all(d["reason"].startswith("future:") for d in dead)


# --- a lost log (real broker, no worker) ---------------------------------------------------


@pytest.mark.integration
def test_a_resume_offset_past_the_log_end_resets_to_the_earliest(
    kafka_broker: TansuBroker,
) -> None:
    bootstrap = kafka_broker.bootstrap
    run = uuid.uuid4().hex[:8]
    source = KafkaInput(bootstrap, TRANSACTIONS, batch_size=100, check_every_s=0.2)
    assert source.list_parts() == [f"{i}-{TRANSACTIONS}" for i in range(4)]
    with TransactionProducer(bootstrap) as producer:
        producer.send_raw(f"k-{run}", b"first")
    (part_no,) = [p for p in range(4) if Consumer(consumer_conf(bootstrap, run))
                  .get_watermark_offsets(TopicPartition(TRANSACTIONS, p), 5)[1] > 0]
    before = _counter("fraud_stream_offset_resets_total", partition=str(part_no))
    part = source.build_part("in", f"{part_no}-{TRANSACTIONS}", 1000)  # a lost log's offset
    try:
        assert _counter("fraud_stream_offset_resets_total", partition=str(part_no)) == before + 1
        assert part.snapshot() == 0
        got: list[Any] = []
        wait_for("the record at offset 0", lambda: got.extend(part.next_batch()) or got, 10)
        assert [(m.value, m.offset) for m in got] == [(b"first", 0)]
        assert part.snapshot() == 1
        # running: a position past the end (as after a broker restart) is noticed too
        part._offset = 500  # noqa: SLF001 - what a restarted empty broker leaves behind
        part._consumer.assign([TopicPartition(TRANSACTIONS, part_no, 500)])  # noqa: SLF001
        wait_for("the running check to reset the offset",
                 lambda: part.next_batch() is not None and part.snapshot() in (0, 1), 10)
        assert _counter("fraud_stream_offset_resets_total", partition=str(part_no)) == before + 2
    finally:
        part.close()
