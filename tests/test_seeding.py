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
    from streaming.features import OnlineStateSeeder

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
