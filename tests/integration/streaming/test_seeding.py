"""The live flow continues each user's history from the online store instead of from zero."""

from __future__ import annotations

import pytest

from feature_repo.config import REPO_DIR
from feature_repo.velocity import LateEventError, UserVelocityState, window_features

MIN = 60_000_000


def _state_with(events: list[tuple[str, int, float, str]]) -> UserVelocityState:
    s = UserVelocityState()
    for e in events:
        s.apply(*e)
    return s


def test_from_row_continues_the_windows_and_merchants() -> None:
    base = 1_790_000_000_000_000
    full = _state_with([("a", base, 5.0, "m1"), ("b", base + 2 * MIN, 7.0, "m2")])
    seeded = UserVelocityState.from_row(full.row(), full.last_row_ts)
    row = seeded.apply("c", base + 4 * MIN, 9.0, "m1")
    assert row is not None
    assert row["recent_txn_ts"] == [base, base + 2 * MIN, base + 4 * MIN]
    assert row["row_ts_us"] > full.last_row_ts
    f = window_features(row["recent_txn_ts"], row["recent_amounts"], row["recent_merchants"],
                        row["known_merchants"], row["known_merchant_first_ts"],
                        base + 5 * MIN, "m2")
    assert f["user_txn_count_10m"] == 3
    assert f["user_amount_sum_1h"] == 21.0
    assert f["user_is_new_merchant"] == 0  # m2 was known before seeding


def test_seeded_state_never_counts_a_replayed_event_twice() -> None:
    base = 1_790_000_000_000_000
    full = _state_with([("a", base, 5.0, "m1"), ("b", base + 2 * MIN, 7.0, "m2")])
    seeded = UserVelocityState.from_row(full.row(), full.last_row_ts)
    with pytest.raises(LateEventError):
        seeded.apply("b", base + 2 * MIN, 7.0, "m2")  # a replay of the stored newest event
    with pytest.raises(LateEventError):
        seeded.apply("x", base + MIN, 1.0, "m3")  # possibly counted already: refused
    assert seeded.ts == [base, base + 2 * MIN]


@pytest.mark.integration
def test_online_seeder_reads_the_materialized_row(materialized_store) -> None:  # type: ignore[no-untyped-def]
    from streaming.seeding import OnlineStateSeeder

    resp = materialized_store.get_online_features(
        features=["user_velocity_fv:recent_txn_ts"], entity_rows=[{"user_id": "u000"}]
    ).to_dict()
    stored = resp["recent_txn_ts"][0]
    assert stored, "the session data should have velocity history for u000"
    seeder = OnlineStateSeeder(REPO_DIR)
    state = seeder("u000")
    assert state is not None and state.ts == list(stored)
    assert seeder("u-never-seen") is None
    row = state.apply("live-1", stored[-1] + MIN, 3.0, "m-live")
    assert row is not None and row["recent_txn_ts"][:-1] == list(stored)[-len(row["recent_txn_ts"]) + 1:]


@pytest.mark.integration
def test_fast_seeding_read_equals_feast_online_read(materialized_store, redis_client) -> None:  # type: ignore[no-untyped-def]
    """The seeder's direct Redis read gives what Feast's `online_read` gives, except that it
    keeps the row time to the microsecond (Feast's read drops everything below the second)."""
    from feature_repo.redis_store.wire import string_key_encoder
    from streaming.seeding import OnlineStateSeeder
    from streaming.velocity_sink import VelocityRow, history_table, online_writer

    users = [f"u{i:03d}" for i in range(40)] + ["u-never-seen", "", "ü-✓"]
    seeder = OnlineStateSeeder(REPO_DIR)
    fast, feast = seeder.read(users), seeder.read_through_feast(users)
    assert sum(r is not None for r in fast) >= 20, "the session data should hold most users"
    assert [r and r[0] for r in fast] == [r and r[0] for r in feast]
    assert [r and r[1] // 1_000_000 for r in fast] == [r and r[1] // 1_000_000 for r in feast]

    # A row the stream writes with a sub-second time comes back exactly.
    state = UserVelocityState()
    row = state.apply("seed-t1", 1_790_000_000_123_456, 12.5, "m-seed")
    assert row is not None
    writer = online_writer(REPO_DIR)
    try:
        rows = [VelocityRow("seed-user", row)]
        writer.write(rows, history_table(rows))
        writer.flush()
    finally:
        writer.close()
    try:
        (stored,) = seeder.read(["seed-user"])
        assert stored is not None and stored[1] == 1_790_000_000_123_456
        assert stored[0]["recent_amounts"] == [12.5]
        assert stored[0]["recent_merchants"] == ["m-seed"]
    finally:
        config = materialized_store.config
        encode = string_key_encoder("user_id", config.entity_key_serialization_version,
                                    config.project.encode())
        assert encode is not None
        redis_client.delete(encode("seed-user"))
