"""Cheaper state-step paths (issue 20, fifth session) decide what the plain code decided: a
state shard skips its own prefetch only where the flow prefetched the batch's users already,
and the state's duplicate check by a set is the list scan it replaced."""

from __future__ import annotations

import random
from typing import Any

import pytest

from feature_repo.contract import TransactionEvent
from feature_repo.velocity import LateEventError, UserVelocityState
from streaming.events import Envelope, parse
from streaming.state import ShardLogic

EVENT = {"transaction_id": "t-1", "user_id": "u-1", "merchant_id": "m-1", "amount": 12.34,
         "currency": "EUR", "channel": "online",
         "event_timestamp": "2026-12-05T10:00:00.123456+02:00"}


class _Seed:
    def __init__(self) -> None:
        self.asked: list[set[str]] = []

    def prefetch(self, user_ids: Any) -> None:
        self.asked.append(set(user_ids))

    def __call__(self, user_id: str, first: TransactionEvent | None = None) -> None:
        return None


@pytest.mark.parametrize("prefetch", [True, False])
def test_shard_prefetches_unless_told_the_flow_did(prefetch: bool) -> None:
    seed = _Seed()
    envs = [parse({**EVENT, "transaction_id": f"t{i}", "user_id": f"u{i % 3}"})
            for i in range(6)]
    logic = ShardLogic(seed, None, prefetch=prefetch)
    out, _ = logic.on_batch([e for e in envs if isinstance(e, Envelope)])
    assert len(out) == 6
    assert seed.asked == ([{"u0", "u1", "u2"}] if prefetch else [])
    # the same rows either way
    other, _ = ShardLogic(None, None).on_batch([e for e in envs if isinstance(e, Envelope)])
    assert out == other


def test_duplicate_check_by_set_is_the_list_scan() -> None:
    """`UserVelocityState.apply` checks a set beside `txn_ids`: an event is a duplicate exactly
    when its id is in the list, through evictions, seeded states ("" ids repeat) and restores."""
    rng = random.Random(5)
    for trial in range(300):
        t = 1_765_000_000_000_000
        if trial % 3 == 0:  # seeded: the row's events carry "" ids
            ts = [t - 5_000_000 * k for k in range(trial % 5, 0, -1)]
            row = {"recent_txn_ts": ts, "recent_amounts": [1.5] * len(ts),
                   "recent_merchants": ["m1"] * len(ts), "known_merchants": ["m1"] if ts else [],
                   "known_merchant_first_ts": ts[:1]}
            state = UserVelocityState.from_row(row, t)
        else:
            state = UserVelocityState()
        ids: list[str] = []
        for step in range(rng.randrange(1, 80)):
            t += rng.choice([1, 60_000_000, 3_600_000_000, -120_000_000, -900_000_000])
            tid = rng.choice(ids) if ids and rng.random() < 0.2 else f"t{trial}-{step}"
            ids.append(tid)
            duplicate = tid in state.txn_ids
            try:
                row_out = state.apply(tid, t, 1.0, f"m{rng.randrange(25)}")
            except LateEventError:
                assert not duplicate
                continue
            assert (row_out is None) == duplicate
            assert state._ids is None or state._ids == set(state.txn_ids)
            if rng.random() < 0.05:  # a recovery in the middle
                state = UserVelocityState.restore(state.snapshot())

