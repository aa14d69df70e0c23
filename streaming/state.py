"""The per-user velocity state machines of the feature dataflow's "velocity" step.

`update_velocity` applies one event to its user's `UserVelocityState`; `VelocityLogic` (one
Bytewax key per user) and `ShardLogic` (one key per shard of users, `user_shard`) run it for
their keys and snapshot the states for recovery.

Guarantees (the flow's exactly-once effect rests on them): applying an event is idempotent by
`transaction_id` (a repeat emits nothing and changes nothing), so the replay of a crash
rebuilds the same rows; an event older than its user's lateness window emits a "late" dead
letter and leaves the state unchanged; a snapshot restores exactly the state it was taken of.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

from bytewax.operators import StatefulBatchLogic

from feature_repo.contract import TransactionEvent, to_micros
from feature_repo.velocity import LateEventError, StateSnapshot, UserVelocityState
from streaming import metrics
from streaming.events import DeadLetter, Envelope
from streaming.velocity_sink import VelocityRow

# The state a user starts from when the flow first sees it, at its first event (None: empty).
# `streaming.seeding.OnlineStateSeeder` reads it from the online store.
Seeder = Callable[[str, TransactionEvent], UserVelocityState | None]
Outcome = VelocityRow | DeadLetter | None  # of one event: a new row, a late event, a duplicate
ShardSnapshot = dict[str, StateSnapshot]  # user_id -> `UserVelocityState.snapshot()`

APPLIED, DUPLICATE, LATE = (metrics.EVENTS.labels(o) for o in ("applied", "duplicate", "late"))


def update_velocity(
    state: UserVelocityState | None, env: Envelope
) -> tuple[UserVelocityState, Outcome]:
    """Apply one event to its user's state: a new row, a 'late' dead letter, or None (dup)."""
    state, outcome = _apply(state, env)
    count_outcomes(1, [] if outcome is None else [outcome])
    return state, outcome


def _apply(state: UserVelocityState | None, env: Envelope) -> tuple[UserVelocityState, Outcome]:
    """`update_velocity` without the outcome counters (the steps count once per batch)."""
    state = state or UserVelocityState()
    e = env.event
    try:
        row = state.apply(e.transaction_id, to_micros(e.event_timestamp), e.amount, e.merchant_id)
    except LateEventError as exc:
        return state, DeadLetter(f"late: {exc}", e.model_dump_json().encode(), e.user_id.encode(),
                                 env.origin)
    if row is None:
        return state, None
    return state, VelocityRow(e.user_id, row, env.produced_at)


def count_outcomes(events: int, out: list[VelocityRow | DeadLetter]) -> None:
    """The outcome counters of `events` events whose non-duplicate outcomes are `out`."""
    late = sum(1 for o in out if isinstance(o, DeadLetter))
    if late:
        LATE.inc(late)
    if len(out) > late:
        APPLIED.inc(len(out) - late)
    if events > len(out):
        DUPLICATE.inc(events - len(out))


class VelocityLogic(StatefulBatchLogic[Envelope, VelocityRow | DeadLetter, StateSnapshot]):
    """The "velocity" step for one user (`state_shards=0`): seed the state on first sight, then
    `update_velocity` per event; emits rows and 'late' dead letters (duplicates emit nothing).

    Recovery snapshots hold `UserVelocityState.snapshot()` (the state's fields, pickled): one
    pickling instead of a deep copy that Bytewax would then pickle.
    """

    def __init__(self, seed: Seeder | None, state: UserVelocityState | None) -> None:
        self._seed = seed
        self._state = state

    def on_batch(self, values: list[Envelope]) -> tuple[list[VelocityRow | DeadLetter], bool]:
        state, out = self._state, []
        for env in values:
            if state is None and self._seed is not None:
                state = self._seed(env.event.user_id, env.event)
            state, outcome = _apply(state, env)
            if outcome is not None:
                out.append(outcome)
        self._state = state
        count_outcomes(len(values), out)
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> StateSnapshot:
        return (self._state or UserVelocityState()).snapshot()


def velocity_logic(
    seed: Seeder | None, resume: StateSnapshot | UserVelocityState | None
) -> VelocityLogic:
    """Builds the step's logic for a user, from its snapshot if recovery has one (a
    `UserVelocityState` is a snapshot of the earlier `stateful_map` step)."""
    if resume is None or isinstance(resume, UserVelocityState):
        return VelocityLogic(seed, resume)
    return VelocityLogic(seed, UserVelocityState.restore(resume))


class ShardLogic(StatefulBatchLogic[Envelope, VelocityRow | DeadLetter, ShardSnapshot]):
    """The "velocity" step for one shard of users (`user_shard`): a `UserVelocityState` per
    user, each updated exactly as `VelocityLogic` updates its one user.

    Why shards: Bytewax's cost is per key, not per event.  Keyed by user, a micro-batch calls
    `on_batch` about once per event, and each epoch snapshots (calls, pickles, stores) every
    user touched in it; with a few hundred shards both costs are per shard (measurements in
    docs/benchmarks.md).

    Snapshots stay incremental per user: a user's pickled state is cached and re-pickled only
    if an event reached it; the shard's snapshot is a dict of those bytes.  The re-pickling is
    done at the end of each `on_batch`, for the users the batch touched, not in `snapshot`:
    Bytewax takes every snapshot on the worker thread at the end of an epoch, and no event is
    processed meanwhile, so work moved out of `snapshot` shortens that stall, which is the
    tail of the stream's freshness (docs/benchmarks.md).  The cost: a user reached in several
    micro-batches of one epoch is pickled once per batch instead of once per epoch.
    Restored users are unpickled when their next event arrives.  Trade-off: every snapshot of
    a shard writes all of its users' bytes, so recovery storage written per epoch grows with
    users per shard (`fraud_stream_snapshot_users_total` counts the user states written);
    raise `state_shards` for very large user bases, or set 0 for one key per user.
    """

    def __init__(self, seed: Seeder | None, pickled: ShardSnapshot | None,
                 prefetch: bool = True) -> None:
        self._seed = seed
        self._users: dict[str, UserVelocityState] = {}
        self._pickled: ShardSnapshot = dict(pickled or {})
        # the seed's `prefetch`, unless the flow already hands it each batch's users where
        # it keys them (one worker: `streaming.flow.build_flow`'s `prefetch_when_keyed`)
        self._prefetch_of = getattr(seed, "prefetch", None) if prefetch else None

    def on_batch(self, values: list[Envelope]) -> tuple[list[VelocityRow | DeadLetter], bool]:
        users, out = self._users, []
        touched: dict[str, UserVelocityState] = {}
        self._prefetch(values)
        for env in values:
            uid = env.event.user_id
            state = users.get(uid)
            if state is None:
                snap = self._pickled.get(uid)
                if snap is not None:
                    state = UserVelocityState.restore(snap)
                elif self._seed is not None:
                    state = self._seed(uid, env.event)
            state, outcome = _apply(state, env)
            users[uid] = touched[uid] = state
            if outcome is not None:
                out.append(outcome)
        pickled = self._pickled
        for uid, state in touched.items():  # what `snapshot` returns, taken now (above)
            pickled[uid] = state.snapshot()
        count_outcomes(len(values), out)
        return out, StatefulBatchLogic.RETAIN

    def _prefetch(self, values: list[Envelope]) -> None:
        """Hand the seed's `prefetch` the batch's users this shard holds no state for, so
        they are read in one round trip (a no-op for users it was already asked about).
        Skipped where the flow prefetched the batch's users already (`prefetch=False`), so
        the set of new users, always empty then, is not built per batch (issue 20)."""
        prefetch = self._prefetch_of
        if prefetch is None:
            return
        users, pickled = self._users, self._pickled
        new = {env.event.user_id for env in values} - users.keys() - pickled.keys()
        if new:
            prefetch(new)

    def snapshot(self) -> ShardSnapshot:
        pickled = self._pickled
        metrics.SNAPSHOT_USERS.inc(len(pickled))
        return dict(pickled)  # bytes are immutable: a shallow copy is an immutable snapshot


class GroupedLogic(StatefulBatchLogic[list[Envelope], VelocityRow | DeadLetter, Any]):
    """A velocity logic (`ShardLogic`, `VelocityLogic`) fed groups: each item is the events of
    one key from one micro-batch, in order (`streaming.flow.key_batch`), applied in order as
    one flat batch; snapshots are the inner logic's, so recovery is unchanged.

    Why: with several processes Bytewax pickles, sends and routes every item of the keyed
    stream separately; one item per key and micro-batch instead of one per event divides that
    per-item work by the events per key in a batch."""

    def __init__(self, inner: StatefulBatchLogic[Envelope, VelocityRow | DeadLetter, Any]) -> None:
        self._inner = inner

    def on_batch(
        self, values: list[list[Envelope]]
    ) -> tuple[Iterable[VelocityRow | DeadLetter], bool]:
        if len(values) == 1:
            return self._inner.on_batch(values[0])
        return self._inner.on_batch([env for group in values for env in group])

    def snapshot(self) -> Any:
        return self._inner.snapshot()


def grouped_logic(
    build: Callable[[Seeder | None, Any], StatefulBatchLogic[Envelope, VelocityRow | DeadLetter,
                                                             Any]],
    seed: Seeder | None, resume: Any,
) -> GroupedLogic:
    """The step's logic builder: `build(seed, resume)` (`ShardLogic`, `velocity_logic`), fed
    groups of events (`GroupedLogic`)."""
    return GroupedLogic(build(seed, resume))


def shard_keys(shards: int) -> list[str]:
    """The shard keys, zero-padded so they sort in shard order."""
    width = len(str(max(shards - 1, 0)))
    return [str(i).zfill(width) for i in range(shards)]


def user_shard(keys: list[str], env: Envelope) -> str:
    """The shard key of the event's user (stable across processes: crc32, not `hash`)."""
    return keys[zlib.crc32(env.event.user_id.encode()) % len(keys)]
