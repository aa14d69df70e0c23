"""Velocity state and window semantics (engine-free), and the Bytewax dataflow built on them.

Semantics under test (feature_repo.velocity): for a transaction of user u at t, only u's
transactions strictly before t count; windows are half-open [t - w, t); the answer is right
however long ago the state was written; duplicates by transaction_id are ignored; events up
to 10 minutes late are merged, older ones are refused.
"""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bytewax.testing import TestingSink, TestingSource, run_main

from feature_repo.contract import to_micros
from feature_repo.velocity import (
    ALLOWED_LATENESS_US,
    HORIZON_US,
    HOUR_US,
    MAX_EVENTS,
    MAX_KNOWN_MERCHANTS,
    MINUTE_US,
    ROW_FIELDS,
    WINDOW_FEATURES,
    LateEventError,
    UserVelocityState,
    window_features,
)
from streaming.events import DeadLetter, Envelope, parse
from streaming.flow import build_flow
from streaming.recovery import state_step_id
from streaming.state import ShardLogic
from streaming.velocity_sink import VelocityRow

SECOND_US = 1_000_000
T0 = to_micros(datetime(2026, 10, 20, 12, 0, tzinfo=UTC))


def feats(row: dict[str, Any] | None, t: int, merchant: str | None = "m-query") -> dict[str, Any]:
    """window_features of a stored row (None = no row) for a transaction at t."""
    args = [row[f] for f in ROW_FIELDS] if row is not None else [None] * len(ROW_FIELDS)
    return window_features(*args, request_ts_us=t, merchant_id=merchant)


def state_with(events: list[tuple[str, int, float, str]]) -> tuple[UserVelocityState, list]:
    """A state after applying (txn_id, ts_us, amount, merchant) in order; and the rows."""
    state = UserVelocityState()
    rows = [state.apply(*e) for e in events]
    return state, rows


# --- window semantics -------------------------------------------------------------------


def test_missing_row_means_no_history() -> None:
    out = feats(None, T0, "m1")
    assert set(out) == set(WINDOW_FEATURES)
    assert out["user_txn_count_10m"] == 0
    assert out["user_txn_count_1h"] == 0
    assert out["user_amount_sum_1h"] == 0.0
    assert out["user_distinct_merchants_24h"] == 0
    assert math.isnan(out["user_seconds_since_last_txn"])
    assert out["user_is_new_merchant"] == 1


def test_transaction_does_not_count_itself() -> None:
    state, rows = state_with([("a", T0, 10.0, "m1")])
    row = rows[0]
    assert row["row_ts_us"] == T0
    at_t = feats(row, T0, "m1")
    assert at_t["user_txn_count_10m"] == 0
    assert at_t["user_txn_count_1h"] == 0
    assert at_t["user_amount_sum_1h"] == 0.0
    assert at_t["user_distinct_merchants_24h"] == 0
    assert math.isnan(at_t["user_seconds_since_last_txn"])
    assert at_t["user_is_new_merchant"] == 1  # first seen at t is not "known before t"
    # one microsecond later the transaction is history
    after = feats(row, T0 + 1, "m1")
    assert after["user_txn_count_10m"] == 1
    assert after["user_amount_sum_1h"] == 10.0
    assert after["user_seconds_since_last_txn"] == pytest.approx(1e-6)
    assert after["user_is_new_merchant"] == 0


def test_each_event_sees_exactly_the_events_before_it() -> None:
    times = [T0, T0 + 3 * MINUTE_US, T0 + 8 * MINUTE_US, T0 + 40 * MINUTE_US, T0 + 2 * HOUR_US]
    state = UserVelocityState()
    for i, ts in enumerate(times):
        row = state.apply(f"t{i}", ts, float(i + 1), f"m{i % 2}")
        assert row is not None
        out = feats(row, ts, "m0")
        before = times[:i]
        assert out["user_txn_count_10m"] == sum(ts - 10 * MINUTE_US <= b for b in before)
        assert out["user_txn_count_1h"] == sum(ts - HOUR_US <= b for b in before)
        assert out["user_amount_sum_1h"] == pytest.approx(
            sum(float(j + 1) for j, b in enumerate(before) if b >= ts - HOUR_US)
        )
        if before:
            assert out["user_seconds_since_last_txn"] == (ts - before[-1]) / 1e6
        else:
            assert math.isnan(out["user_seconds_since_last_txn"])


def test_window_boundaries_are_half_open() -> None:
    t = T0 + 2 * HORIZON_US
    events = [
        ("d24_out", t - HORIZON_US - 1, 1.0, "m_old"),  # just outside 24h
        ("d24_in", t - HORIZON_US, 2.0, "m_24h"),  # exactly t-24h: inside
        ("h1_out", t - HOUR_US - 1, 4.0, "m_a"),  # just outside 1h
        ("h1_in", t - HOUR_US, 8.0, "m_b"),  # exactly t-1h: inside
        ("m10_out", t - 10 * MINUTE_US - 1, 16.0, "m_b"),  # just outside 10 min
        ("m10_in", t - 10 * MINUTE_US, 32.0, "m_c"),  # exactly t-10min: inside
        ("last", t - 1, 64.0, "m_c"),  # 1 us before t
        ("self", t, 128.0, "m_d"),  # at t: excluded
    ]
    state, rows = state_with(events)
    out = feats(rows[-1], t, "m_d")
    assert out["user_txn_count_10m"] == 2  # m10_in, last
    assert out["user_txn_count_1h"] == 4  # h1_in, m10_out, m10_in, last
    assert out["user_amount_sum_1h"] == 8.0 + 16.0 + 32.0 + 64.0
    assert out["user_distinct_merchants_24h"] == 4  # m_24h, m_a, m_b, m_c
    assert out["user_seconds_since_last_txn"] == 1e-6
    assert out["user_is_new_merchant"] == 1  # m_d first seen at t


def test_distinct_merchants_24h_boundary() -> None:
    t = T0 + 2 * HORIZON_US
    _, rows = state_with([("a", t - HORIZON_US - 1, 1.0, "m1"), ("b", t - HORIZON_US, 1.0, "m2")])
    assert feats(rows[-1], t)["user_distinct_merchants_24h"] == 1
    assert feats(rows[-1], t + 1)["user_distinct_merchants_24h"] == 0
    assert feats(rows[-1], t - 1)["user_distinct_merchants_24h"] == 2


def test_correct_hours_after_the_last_event() -> None:
    """A row written long ago is windowed at query time, not frozen at write time."""
    _, rows = state_with(
        [("a", T0, 5.0, "m1"), ("b", T0 + 5 * MINUTE_US, 7.0, "m2")]
    )
    row = rows[-1]
    q = T0 + 12 * MINUTE_US
    assert feats(row, q)["user_txn_count_10m"] == 1
    assert feats(row, q)["user_txn_count_1h"] == 2
    q = T0 + 3 * HOUR_US
    out = feats(row, q, "m1")
    assert out["user_txn_count_10m"] == 0
    assert out["user_txn_count_1h"] == 0
    assert out["user_amount_sum_1h"] == 0.0
    assert out["user_distinct_merchants_24h"] == 2
    assert out["user_seconds_since_last_txn"] == (3 * HOUR_US - 5 * MINUTE_US) / 1e6
    assert out["user_is_new_merchant"] == 0
    q = T0 + 5 * HORIZON_US
    out = feats(row, q, "m2")
    assert out["user_distinct_merchants_24h"] == 0
    assert out["user_seconds_since_last_txn"] == (5 * HORIZON_US - 5 * MINUTE_US) / 1e6
    assert out["user_is_new_merchant"] == 0


def test_ties_neither_counts_the_other_and_row_timestamps_increase() -> None:
    state, rows = state_with(
        [("a", T0, 1.0, "m1"), ("b", T0, 2.0, "m2"), ("c", T0, 4.0, "m3")]
    )
    assert [r["row_ts_us"] for r in rows] == [T0, T0 + 1, T0 + 2]
    for row in rows:
        out = feats(row, T0, "m1")
        assert out["user_txn_count_10m"] == 0
        assert out["user_distinct_merchants_24h"] == 0
        assert math.isnan(out["user_seconds_since_last_txn"])
        assert out["user_is_new_merchant"] == 1
    assert rows[-1]["recent_txn_ts"] == [T0, T0, T0]
    # a real event 1 us later still gets a strictly later row timestamp than the ties' rows
    row = state.apply("d", T0 + 1, 8.0, "m1")
    assert row is not None
    assert row["row_ts_us"] == T0 + 3
    out = feats(row, T0 + 1, "m1")
    assert out["user_txn_count_10m"] == 3
    assert out["user_amount_sum_1h"] == 7.0
    assert out["user_seconds_since_last_txn"] == 1e-6
    assert out["user_is_new_merchant"] == 0


def test_duplicate_transaction_id_is_ignored() -> None:
    state, rows = state_with([("a", T0, 1.0, "m1"), ("b", T0 + MINUTE_US, 2.0, "m2")])
    before = state.row()
    assert state.apply("a", T0, 1.0, "m1") is None
    # a replay with different payload is still the same transaction
    assert state.apply("b", T0 + 2 * MINUTE_US, 99.0, "m9") is None
    assert state.row() == before
    assert "m9" not in state.row()["known_merchants"]
    row = state.apply("c", T0 + 3 * MINUTE_US, 3.0, "m1")
    assert row is not None
    assert feats(row, T0 + 4 * MINUTE_US)["user_txn_count_10m"] == 3


def test_late_event_within_allowed_lateness_is_merged_and_counted() -> None:
    newest = T0 + HOUR_US
    state, rows = state_with([("a", T0, 1.0, "m1"), ("b", newest, 2.0, "m1")])
    late_ts = newest - ALLOWED_LATENESS_US  # exactly at the allowed limit: accepted
    row = state.apply("late", late_ts, 4.0, "m_late")
    assert row is not None
    assert row["row_ts_us"] > rows[-1]["row_ts_us"]  # still strictly increasing
    assert row["recent_txn_ts"] == sorted(row["recent_txn_ts"])
    assert row["recent_txn_ts"] == [T0, late_ts, newest]
    assert row["recent_amounts"] == [1.0, 4.0, 2.0]
    at_newest = feats(row, newest, "m_late")
    assert at_newest["user_txn_count_10m"] == 1  # the late event, exactly at newest - 10 min
    assert at_newest["user_txn_count_1h"] == 2  # a (exactly newest - 1h) and the late one
    assert at_newest["user_seconds_since_last_txn"] == ALLOWED_LATENESS_US / 1e6
    assert at_newest["user_is_new_merchant"] == 0
    out = feats(row, newest + 1, "m_late")
    assert out["user_txn_count_10m"] == 1  # b; the late event is now 10 min + 1 us back
    assert out["user_txn_count_1h"] == 2  # late and b
    assert out["user_amount_sum_1h"] == 6.0
    first = dict(zip(row["known_merchants"], row["known_merchant_first_ts"], strict=True))
    assert first["m_late"] == late_ts


def test_event_beyond_allowed_lateness_is_refused_and_changes_nothing() -> None:
    newest = T0 + HOUR_US
    state, _ = state_with([("a", T0, 1.0, "m1"), ("b", newest, 2.0, "m1")])
    before = state.row()
    with pytest.raises(LateEventError, match="allowed lateness"):
        state.apply("late", newest - ALLOWED_LATENESS_US - 1, 4.0, "m_late")
    assert state.row() == before
    # the refused id was not remembered: it is not a duplicate later
    assert state.apply("late", newest + 1, 4.0, "m_late") is not None


def test_eviction_keeps_the_latest_event_before_the_horizon() -> None:
    state = UserVelocityState()
    state.apply("a", T0, 1.0, "m_a")
    state.apply("b", T0 + HOUR_US, 2.0, "m_b")
    row = state.apply("c", T0 + 30 * HOUR_US, 3.0, "m_c")
    assert row is not None
    # a is older than the horizon and not the latest such event: dropped
    assert row["recent_txn_ts"] == [T0 + HOUR_US, T0 + 30 * HOUR_US]
    assert row["recent_merchants"] == ["m_b", "m_c"]
    # merchants are remembered beyond the horizon
    assert row["known_merchants"] == ["m_a", "m_b", "m_c"]
    assert row["known_merchant_first_ts"] == [T0, T0 + HOUR_US, T0 + 30 * HOUR_US]
    out = feats(row, T0 + 30 * HOUR_US, "m_a")
    assert out["user_seconds_since_last_txn"] == 29 * 3600.0
    assert out["user_is_new_merchant"] == 0
    assert out["user_distinct_merchants_24h"] == 0  # b is 29h before c's time
    row = state.apply("d", T0 + 100 * HOUR_US, 4.0, "m_d")
    assert row is not None
    assert row["recent_txn_ts"] == [T0 + 30 * HOUR_US, T0 + 100 * HOUR_US]
    out = feats(row, T0 + 100 * HOUR_US, "m_b")
    assert out["user_seconds_since_last_txn"] == 70 * 3600.0  # exact after eviction
    assert out["user_txn_count_1h"] == 0
    assert out["user_is_new_merchant"] == 0


def test_bounds_saturate_events_and_merchants() -> None:
    state = UserVelocityState()
    n = MAX_EVENTS + 20
    for i in range(n):
        state.apply(f"t{i}", T0 + i * SECOND_US, 1.0, f"m{i % (MAX_KNOWN_MERCHANTS + 10):04d}")
    row = state.row()
    assert len(row["recent_txn_ts"]) == MAX_EVENTS
    assert row["recent_txn_ts"][0] == T0 + (n - MAX_EVENTS) * SECOND_US  # oldest dropped
    assert len(row["known_merchants"]) == MAX_KNOWN_MERCHANTS
    assert row["known_merchants"] == sorted(row["known_merchants"])
    # least recently used merchants were dropped: the most recent one is kept
    assert f"m{(n - 1) % (MAX_KNOWN_MERCHANTS + 10):04d}" in row["known_merchants"]
    out = feats(row, T0 + n * SECOND_US)
    assert out["user_txn_count_1h"] == MAX_EVENTS  # saturated, documented


def test_is_new_merchant() -> None:
    _, rows = state_with([("a", T0, 1.0, "m1"), ("b", T0 + MINUTE_US, 1.0, "m2")])
    row = rows[-1]
    q = T0 + 2 * MINUTE_US
    assert feats(row, q, "m1")["user_is_new_merchant"] == 0
    assert feats(row, q, "m2")["user_is_new_merchant"] == 0
    assert feats(row, q, "m0")["user_is_new_merchant"] == 1  # sorts before every known one
    assert feats(row, q, "m3")["user_is_new_merchant"] == 1  # sorts after every known one
    assert feats(row, q, None)["user_is_new_merchant"] == 1
    # m2 was first seen at T0+1min: new for a transaction at that instant, known after it
    assert feats(row, T0 + MINUTE_US, "m2")["user_is_new_merchant"] == 1
    assert feats(row, T0 + MINUTE_US + 1, "m2")["user_is_new_merchant"] == 0


# --- randomized oracle ------------------------------------------------------------------


def _oracle(events: list[tuple[str, int, float, str]], q: int, merchant: str) -> dict[str, Any]:
    prior = [e for e in events if e[1] < q]
    in_10m = [e for e in prior if e[1] >= q - 10 * MINUTE_US]
    in_1h = [e for e in prior if e[1] >= q - HOUR_US]
    in_24h = [e for e in prior if e[1] >= q - HORIZON_US]
    last = max((e[1] for e in prior), default=None)
    return {
        "user_txn_count_10m": len(in_10m),
        "user_txn_count_1h": len(in_1h),
        "user_amount_sum_1h": sum(e[2] for e in in_1h),
        "user_distinct_merchants_24h": len({e[3] for e in in_24h}),
        "user_seconds_since_last_txn": math.nan if last is None else (q - last) / 1e6,
        "user_is_new_merchant": int(merchant not in {e[3] for e in prior}),
    }


def _random_stream(rng: random.Random, users: int) -> list[tuple[str, tuple[str, int, float, str]]]:
    """Arrival-ordered (user, event) with bursts, ties, <10 min disorder and re-sent ids."""
    stream = []
    n = 0
    for u in range(users):
        t = T0
        for _ in range(rng.randint(40, 120)):
            gap = rng.choice([0, 1, SECOND_US, 30 * SECOND_US, 4 * MINUTE_US, 10 * MINUTE_US,
                              50 * MINUTE_US, HOUR_US, 5 * HOUR_US, 23 * HOUR_US, 3 * HORIZON_US])
            t += gap if gap in (0, 1) else rng.randint(1, gap)
            event = (f"t{n}", t, round(rng.uniform(1, 500), 2), f"m{rng.randint(0, 12)}")
            n += 1
            # arrival = event time + jitter below the allowed lateness: disorder stays legal
            stream.append((t + rng.randint(0, ALLOWED_LATENESS_US - 1), f"u{u}", event))
    stream.sort(key=lambda x: (x[0], x[1]))
    out = [(user, event) for _, user, event in stream]
    for _ in range(len(out) // 10):  # re-sends of a recent event (at-least-once producers)
        i = rng.randrange(1, len(out))
        j = rng.randrange(max(0, i - 5), i)
        # a retry arrives soon after the original: within the allowed lateness
        if out[j][0] == out[i][0] and out[i][1][1] - out[j][1][1] < ALLOWED_LATENESS_US // 2:
            out.insert(i + 1, out[j])
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomized_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    stream = _random_stream(rng, users=4)
    states: dict[str, UserVelocityState] = {}
    seen: dict[str, list[tuple[str, int, float, str]]] = {}
    last_row_ts: dict[str, int] = {}
    checks = 0
    exercised = {"resent": 0, "out_of_order": 0, "tie": 0}
    for user, event in stream:
        state = states.setdefault(user, UserVelocityState())
        events = seen.setdefault(user, [])
        row = state.apply(*event)
        if any(e[0] == event[0] for e in events):
            assert row is None, "a re-sent transaction must not produce a row"
            exercised["resent"] += 1
            continue
        assert row is not None
        exercised["out_of_order"] += any(e[1] > event[1] for e in events)
        exercised["tie"] += any(e[1] == event[1] for e in events)
        events.append(event)
        assert row["row_ts_us"] > last_row_ts.get(user, -1)
        assert row["row_ts_us"] >= max(e[1] for e in events)
        last_row_ts[user] = row["row_ts_us"]
        assert row["recent_txn_ts"] == sorted(row["recent_txn_ts"])
        newest = max(e[1] for e in events)
        # query times at or after the newest event (what serving and the PIT join ask)
        queries = [newest, newest + 1, newest + rng.randint(1, 2 * HORIZON_US)]
        queries += [e[1] + w for e in events[-3:] for w in (10 * MINUTE_US, HOUR_US, HORIZON_US)
                    if e[1] + w >= newest]
        for q in queries:
            merchant = rng.choice([event[3], f"m{rng.randint(0, 14)}"])
            got = feats(row, q, merchant)
            want = _oracle(events, q, merchant)
            for name in WINDOW_FEATURES:
                if name == "user_seconds_since_last_txn" and math.isnan(want[name]):
                    assert math.isnan(got[name]), (user, event, q, name)
                elif name == "user_amount_sum_1h":
                    assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-9)
                else:
                    assert got[name] == want[name], (user, event, q, name, got, want)
            checks += 1
    assert checks > 500
    assert min(exercised.values()) > 0, exercised  # the stream covers the hard cases


# --- dataflow ---------------------------------------------------------------------------


def _event(txn: str, user: str, ts: datetime, amount: float = 10.0, **kw: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "transaction_id": txn,
        "user_id": user,
        "merchant_id": kw.pop("merchant_id", "m1"),
        "amount": amount,
        "currency": "EUR",
        "channel": "online",
        "event_timestamp": ts,
        **kw,
    }


def _run(items: list[Any]) -> tuple[list[tuple[str, VelocityRow]], list[DeadLetter]]:
    rows: list[tuple[str, VelocityRow]] = []
    dead: list[DeadLetter] = []
    run_main(build_flow(TestingSource(items), TestingSink(rows), TestingSink(dead)))
    return rows, dead


START = datetime(2026, 10, 20, 12, 0, tzinfo=UTC)


def test_flow_valid_events_produce_rows_per_user() -> None:
    items = [
        _event("a1", "ua", START),
        _event("b1", "ub", START + timedelta(seconds=5), merchant_id="m2"),
        _event("a2", "ua", START + timedelta(minutes=2), amount=20.0),
        json.dumps(
            _event("a3", "ua", START + timedelta(minutes=3), 5.0) | {
                "event_timestamp": (START + timedelta(minutes=3)).isoformat()}
        ).encode(),
    ]
    rows, dead = _run(items)
    assert dead == []
    assert [(k, r.user_id) for k, r in rows] == [("ua", "ua"), ("ub", "ub"), ("ua", "ua"),
                                                  ("ua", "ua")]
    last = [r for k, r in rows if k == "ua"][-1].row
    t3 = to_micros(START + timedelta(minutes=3))
    assert last["row_ts_us"] == t3
    assert last["recent_amounts"] == [10.0, 20.0, 5.0]
    out = feats(last, t3)
    assert out["user_txn_count_10m"] == 2
    assert out["user_amount_sum_1h"] == 30.0
    ub = [r for k, r in rows if k == "ub"][0].row
    assert ub["recent_merchants"] == ["m2"]


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({k: v for k, v in _event("x", "u", START).items() if k != "merchant_id"}, "merchant_id"),
        (_event("x", "u", START, amount=-3.0), "amount"),
        (_event("x", "u", START.replace(tzinfo=None)), "event_timestamp"),
        (_event("x", "u", START, schema_version=2), "schema_version"),
        (_event("x", "u", START, currency="XYZ"), "currency"),
        (b'{"transaction_id": "x", "user_id": ', "json"),
        (b"\xff\xfe not json", "json"),
    ],
    ids=["missing_field", "negative_amount", "naive_ts", "schema_version", "currency",
         "truncated_json", "binary"],
)
def test_flow_invalid_events_become_dead_letters(item: Any, field: str) -> None:
    good = _event("ok", "u", START)
    rows, dead = _run([item, good])
    assert [r.row["recent_txn_ts"] for _, r in rows] == [[to_micros(START)]]
    assert len(dead) == 1
    assert isinstance(dead[0], DeadLetter)
    assert dead[0].reason.startswith("invalid event")
    assert field in dead[0].reason.lower(), dead[0].reason
    assert dead[0].original  # the original is kept, nothing is lost
    if isinstance(item, bytes):
        assert dead[0].original == item


def test_flow_duplicates_produce_no_row() -> None:
    e = _event("a1", "ua", START)
    rows, dead = _run([e, e, _event("a1", "ua", START + timedelta(seconds=1)), e])
    assert dead == []
    assert len(rows) == 1


def test_flow_late_event_goes_to_dead_letters() -> None:
    items = [
        _event("a1", "ua", START),
        _event("a2", "ua", START - timedelta(minutes=9)),  # within lateness: a row
        _event("a3", "ua", START - timedelta(minutes=11)),  # beyond: dead letter
        _event("b1", "ub", START - timedelta(hours=5)),  # other user: own clock
    ]
    rows, dead = _run(items)
    assert [r.user_id for _, r in rows] == ["ua", "ua", "ub"]
    assert len(dead) == 1
    assert dead[0].reason.startswith("late")
    assert json.loads(dead[0].original)["transaction_id"] == "a3"
    assert dead[0].key == b"ua"
    assert rows[1][1].row["recent_txn_ts"] == [
        to_micros(START - timedelta(minutes=9)), to_micros(START)
    ]


def test_resent_transaction_older_than_the_horizon_is_refused_not_counted_twice() -> None:
    """Ids are forgotten with their events; a very old re-send is then refused as late."""
    state, _ = state_with([("a", T0, 1.0, "m1"), ("b", T0 + HOUR_US, 1.0, "m1")])
    state.apply("c", T0 + 2 * HORIZON_US, 1.0, "m1")
    assert T0 not in state.row()["recent_txn_ts"]  # a was evicted
    before = state.row()
    with pytest.raises(LateEventError):
        state.apply("a", T0, 1.0, "m1")
    assert state.row() == before


# --- state layout: shards of users vs one key per user ---------------------------------------


def _items(stream: list[tuple[str, tuple[str, int, float, str]]]) -> list[dict[str, Any]]:
    return [_event(txn, user, datetime.fromtimestamp(ts / 1e6, UTC), amount, merchant_id=m)
            for user, (txn, ts, amount, m) in stream]


def _per_user(rows: list[tuple[str, VelocityRow]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for key, r in rows:
        assert key == r.user_id  # the sink is keyed by user in both layouts
        out.setdefault(key, []).append(r.row)
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_sharded_state_gives_the_rows_and_dead_letters_of_state_keyed_by_user(seed: int) -> None:
    rng = random.Random(seed)
    stream = _random_stream(rng, users=12)
    # plus events beyond the allowed lateness, which must become dead letters in both layouts
    late = [(u, (f"late-{u}", T0 - 2 * ALLOWED_LATENESS_US, 1.0, "m0")) for u in ("u0", "u5")]
    items = _items(stream[:200] + late + stream[200:])
    results = {}
    for shards in (0, 1, 5, 256):
        rows, dead = [], []
        run_main(build_flow(TestingSource(items, batch_size=17), TestingSink(rows),
                            TestingSink(dead), state_shards=shards))
        results[shards] = (_per_user(rows), sorted((d.key, d.reason, d.original) for d in dead))
    by_user, dead = results[0]
    assert sum(map(len, by_user.values())) > 500 and len(dead) == 2
    for shards in (1, 5, 256):
        assert results[shards] == results[0], shards  # per user: same rows in the same order


def _env(txn: str, user: str, minutes: float, merchant: str = "m1") -> Envelope:
    out = parse(_event(txn, user, START + timedelta(minutes=minutes), merchant_id=merchant))
    assert isinstance(out, Envelope)
    return out


def test_shard_snapshot_repickles_only_users_with_new_events_and_resumes_exactly() -> None:
    logic = ShardLogic(None, None)
    logic.on_batch([_env("a1", "ua", 0), _env("b1", "ub", 1), _env("c1", "uc", 2)])
    first = logic.snapshot()
    kept = dict(first)
    logic.on_batch([_env("a2", "ua", 3, "m2"), _env("a1", "ua", 0)])  # a new event, a duplicate
    second = logic.snapshot()
    assert first == kept  # a snapshot is not changed by later events or snapshots
    assert second["ub"] is first["ub"] and second["uc"] is first["uc"]  # not re-pickled
    assert second["ua"] != first["ua"]
    assert logic.snapshot() == second  # nothing new: the same snapshot

    resumed = ShardLogic(None, second)  # what Bytewax builds from recovery after a restart
    more = [_env("b2", "ub", 4), _env("a2", "ua", 3, "m2"), _env("a3", "ua", 5), _env("d1", "ud", 6)]
    got, _ = resumed.on_batch(more)
    want, _ = logic.on_batch(more)
    assert [(r.user_id, r.row) for r in got] == [(r.user_id, r.row) for r in want]
    assert len(got) == 3  # the replayed a2 is a duplicate after the restart too
    assert _states(resumed.snapshot()) == _states(logic.snapshot())


def _states(snapshot: dict[str, bytes]) -> dict[str, UserVelocityState]:
    return {u: UserVelocityState.restore(b) for u, b in snapshot.items()}


def test_state_step_id_never_returns_to_a_layout_left_behind(tmp_path: Any) -> None:
    """Its snapshots would be older than the online rows written since."""
    old = tmp_path / "old"  # a recovery directory from before shards: per-user "velocity"
    old.mkdir()
    assert state_step_id(old, 0) == "velocity"  # continues from the state it holds
    assert state_step_id(old, 0) == "velocity"
    new = tmp_path / "new"
    new.mkdir()
    assert [state_step_id(new, n) for n in (256, 256, 0, 0, 256, 64, 256)] == [
        "velocity_256shards", "velocity_256shards", "velocity_per-user_g1",
        "velocity_per-user_g1", "velocity_256shards_g2", "velocity_64shards_g3",
        "velocity_256shards_g4"]
