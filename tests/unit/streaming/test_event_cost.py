"""The stream's cheaper per-event paths (issue 20) give what the plain code gave: the Kafka
record's message, the history table, the state snapshots (marshal, and pickle where marshal
would not keep a value), the varints of the Redis encoder and epoch microseconds."""

from __future__ import annotations

import math
import pickle
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from bytewax.connectors.kafka import KafkaSourceMessage

from feature_repo.contract import to_micros
from feature_repo.redis_store.tokens import varint, varint_size
from feature_repo.velocity import UserVelocityState
from streaming.kafka_input import _source_message
from streaming.velocity_sink import HISTORY_SCHEMA, VelocityRow, history_table


class _Record:
    """What `_source_message` reads of a confluent_kafka `Message` (its accessor methods)."""

    def __init__(self, headers: list[tuple[str, bytes]] | None) -> None:
        self._headers = headers

    def key(self) -> bytes:
        return b"u-1"

    def value(self) -> bytes:
        return b"{}"

    def topic(self) -> str:
        return "transactions"

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def latency(self) -> float:
        return 0.25

    def offset(self) -> int:
        return 42

    def partition(self) -> int:
        return 3

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_765_000_000_123)


@pytest.mark.parametrize("headers", [None, [("h", b"v")]])
def test_source_message_equals_the_constructed_message(headers: Any) -> None:
    got = _source_message(_Record(headers))  # type: ignore[arg-type]
    want = KafkaSourceMessage(key=b"u-1", value=b"{}", topic="transactions",
                              headers=headers or [], latency=0.25, offset=42, partition=3,
                              timestamp=(1, 1_765_000_000_123))
    assert got == want and type(got) is KafkaSourceMessage
    with pytest.raises(AttributeError):  # still frozen
        got.offset = 1  # type: ignore[misc]


def _rows(n: int, seed: int) -> list[VelocityRow]:
    rng = random.Random(seed)
    states: dict[str, UserVelocityState] = {}
    rows = []
    t = 1_765_000_000_000_000
    for i in range(n):
        user = f"u{rng.randrange(20)}"
        t += rng.randrange(1, 10_000_000)
        state = states.setdefault(user, UserVelocityState())
        row = state.apply(f"t{i}", t, rng.random() * 100, f"m{rng.randrange(30)}")
        assert row is not None
        rows.append(VelocityRow(user, row, None))
    return rows


def test_history_table_is_the_row_by_row_conversion() -> None:
    rows = _rows(300, 1)
    ts = pa.array([r.row["row_ts_us"] for r in rows], pa.timestamp("us", tz="UTC"))
    cols: dict[str, Any] = {"user_id": pa.array([r.user_id for r in rows], pa.string()),
                            "event_timestamp": ts, "created_timestamp": ts}
    for name in HISTORY_SCHEMA.names[3:]:
        cols[name] = pa.array([r.row[name] for r in rows], HISTORY_SCHEMA.field(name).type)
    assert history_table(rows).equals(pa.table(cols, schema=HISTORY_SCHEMA))
    assert history_table([]).equals(HISTORY_SCHEMA.empty_table())


def _plain_state() -> UserVelocityState:
    state = UserVelocityState()
    state.apply("t1", 1_765_000_000_000_000, 12.5, "m1")
    state.apply("t2", 1_765_000_001_000_000, 1e-300, "m2")
    state.apply("t3", 1_765_000_002_000_000, -0.0, "m1")
    return state


def test_plain_states_are_marshalled_and_restore_exactly() -> None:
    state = _plain_state()
    snap = state.snapshot()
    assert snap[:1] != b"\x80"  # not a pickle
    back = UserVelocityState.restore(snap)
    assert back.ts == state.ts and back.merchants == state.merchants
    assert back.txn_ids == state.txn_ids and back.known == state.known
    assert back.amounts == [12.5, 1e-300, -0.0] and math.copysign(1, back.amounts[2]) == -1
    assert (back.last_row_ts, back.seeded_until) == (state.last_row_ts, state.seeded_until)
    assert back.apply("t4", 1_765_000_003_000_000, 1.0, "m3") == state.apply(
        "t4", 1_765_000_003_000_000, 1.0, "m3")


def test_marshalled_floats_keep_their_bits() -> None:
    state = UserVelocityState()
    for i, amount in enumerate((math.nan, math.inf, 0.1 + 0.2, 5e-324)):
        state.apply(f"t{i}", 1_765_000_000_000_000 + i, amount, "m")
    back = UserVelocityState.restore(state.snapshot())
    assert [a.hex() for a in back.amounts] == [a.hex() for a in state.amounts]


def test_snapshots_pickled_before_still_restore() -> None:
    state = _plain_state()
    old = pickle.dumps((state.ts, state.amounts, state.merchants, state.txn_ids, state.known,
                        state.last_row_ts, state.seeded_until), pickle.HIGHEST_PROTOCOL)
    assert UserVelocityState.restore(old) == UserVelocityState.restore(state.snapshot())


def test_values_marshal_would_change_are_pickled() -> None:
    """marshal writes a numpy integer as its bytes: such a state is pickled, and so are its
    restored copies."""
    state = _plain_state()
    state.apply("t4", np.int64(1_765_000_003_000_000), 1.0, "m3")  # type: ignore[arg-type]
    snap = state.snapshot()
    assert snap[:1] == b"\x80"
    back = UserVelocityState.restore(snap)
    assert back == state and type(back.ts[-1]) is np.int64
    assert back.snapshot()[:1] == b"\x80"
    seeded = UserVelocityState.from_row(
        {"recent_txn_ts": [np.int64(5)], "recent_amounts": [1.0], "recent_merchants": ["m"],
         "known_merchants": ["m"], "known_merchant_first_ts": [5]}, 5)
    assert seeded.snapshot()[:1] == b"\x80"
    assert UserVelocityState.from_row(
        {"recent_txn_ts": [5], "recent_amounts": [1], "recent_merchants": ["m"],
         "known_merchants": ["m"], "known_merchant_first_ts": [5]}, 5).snapshot()[:1] != b"\x80"


def _varint_ref(v: int) -> bytes:
    u = v & (2**64 - 1)
    out = bytearray()
    while True:
        byte, u = u & 0x7F, u >> 7
        out.append(byte | (0x80 if u else 0))
        if not u:
            return bytes(out)


def test_varints_are_protobufs() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([
        [0, 1, 127, 128, 16_383, 16_384, 2**63 - 1, -1, -(2**63)],
        rng.integers(-(2**63), 2**63 - 1, 500), rng.integers(0, 1000, 500),
        1_765_000_000_000_000 + rng.integers(0, 10**9, 500)]).astype(np.int64)
    m, size = varint(values)
    assert size.dtype == np.int64 and np.array_equal(size, varint_size(values))
    for j, v in enumerate(values.tolist()):
        assert bytes(m[:size[j], j]) == _varint_ref(v), v
    empty_m, empty_size = varint(np.array([], dtype=np.int64))
    assert empty_m.shape == (1, 0) and len(empty_size) == 0


def test_to_micros_is_exact() -> None:
    rng = random.Random(0)
    start = datetime(1, 1, 2, tzinfo=UTC)
    span = (datetime(9999, 12, 30, tzinfo=UTC) - start) // timedelta(microseconds=1)
    for _ in range(10_000):
        ts = start + timedelta(microseconds=rng.randrange(span))
        ts = ts.astimezone(timezone(timedelta(minutes=rng.randrange(-600, 600))))
        d = ts - datetime(1970, 1, 1, tzinfo=UTC)
        assert to_micros(ts) == (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds
