"""The user-velocity feature dataflow: events in, velocity rows out, bad events to the DLQ.

`build_flow(source, sink, dlq_sink)` is the one factory: the live worker wires it to Kafka and
Feast (`get_flow`, run by `python -m streaming.features` or
`python -m bytewax.run streaming.features:get_flow`), the backfill to the parquet log and the
offline history, tests to in-memory sources and sinks.

Delivery: with Bytewax recovery (the `python -m streaming.features` default) the input offsets
and per-user state are snapshotted together every `snapshot_interval_s`; a worker killed at any
moment resumes from its last snapshot and replays the events after it.  State updates are
idempotent by `transaction_id` and sink writes idempotent by (user, row timestamp), so nothing
is lost and nothing is counted twice (at-least-once delivery, exactly-once effect).

Late events: an event up to `feature_repo.velocity.ALLOWED_LATENESS_US` (10 min) behind its
user's newest event is merged into the state and counts from then on; an older one goes to the
DLQ with reason "late".  A repeated `transaction_id` is ignored (counted as a duplicate).

Future events: an event more than `max_future_s` (`FRAUD_MAX_FUTURE_SECONDS`, 300 s, the API's
bound) ahead of the reference clock goes to the DLQ with reason "future" before it reaches any
state, so it never moves a user's clock.  The reference clock is min(wall clock, the Kafka
record's timestamp), deterministic when a crash replays the record; for a log record (no
ingestion time) the wall clock.  A user's newest event is therefore at most 300 s ahead of
real time, and the lateness window (10 min behind it) cannot be pushed past real events; the
default bound must stay below `ALLOWED_LATENESS_US` (tested).
"""

from __future__ import annotations

import gc
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, cast

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink

from feature_repo.contract import TransactionEvent, max_future_seconds, to_micros
from feature_repo.velocity import ROW_FIELDS, LateEventError, StateSnapshot, UserVelocityState
from streaming import metrics
from streaming.config import DEFAULT_STATE_SHARDS
from streaming.events import DeadLetter, Envelope, future_reason, parse
from streaming.kafka_input import KafkaInput
from streaming.velocity_sink import VELOCITY_VIEW, VelocityRow

log = logging.getLogger(__name__)

Outcome = VelocityRow | DeadLetter | None
APPLIED, DUPLICATE, LATE, INVALID, FUTURE = (
    metrics.EVENTS.labels(o) for o in ("applied", "duplicate", "late", "invalid", "future")
)


def parse_item(
    item: Any, now_s: float | None = None, max_future_s: float | None = None
) -> Envelope | DeadLetter:
    """Kafka message, raw bytes or a log record -> validated event or dead letter.

    With `max_future_s`, an event more than that far ahead of the reference clock is a
    "future" dead letter: the reference is min(`now_s` (wall clock, epoch seconds), the Kafka
    record's timestamp), or `now_s` for anything else.
    """
    now_s = time.time() if now_s is None else now_s
    if isinstance(item, KafkaSourceMessage):
        ts_type, ts_ms = item.timestamp if item.timestamp else (0, 0)
        produced_at = ts_ms / 1000 if ts_type else None
        origin = (item.topic, item.partition, item.offset)
        value = item.value or b""
        out = parse(value, produced_at, origin)
        if isinstance(out, DeadLetter):
            return DeadLetter(out.reason, out.original, item.key, origin)
        if max_future_s is not None:
            ref = now_s if produced_at is None else min(now_s, produced_at)
            reason = _future(out.event, ref, max_future_s)
            if reason is not None:
                return DeadLetter(reason, value, item.key, origin)
        return out
    out = parse(item)
    if max_future_s is not None and isinstance(out, Envelope):
        reason = _future(out.event, now_s, max_future_s)
        if reason is not None:
            e = out.event
            return DeadLetter(reason, e.model_dump_json().encode(), e.user_id.encode())
    return out


def _future(event: TransactionEvent, ref_s: float, bound_s: float) -> str | None:
    """`future_reason`, with a float fast path for the events clearly within the bound (a
    quarter of the parse step's cost otherwise)."""
    if event.event_timestamp.timestamp() < ref_s + bound_s - 0.001:
        return None
    return future_reason(event, ref_s, bound_s)


Seeder = Callable[[str, TransactionEvent], UserVelocityState | None]  # (user, first event)
_UNREAD: Any = object()
SEED_TIMEOUT_S = 5.0  # socket timeout of the seeding reads
_YEAR_2000_S = 946_684_800


class OnlineStateSeeder:
    """First sight of a user in this flow: continue from the row in the online store.

    Without it a live flow would start every user from nothing and overwrite the history the
    backfill and `feast materialize` put online.  `prefetch` (in the flow's "key" step,
    once per micro-batch) reads the rows of all users of the batch it has not been asked about
    yet in one pipelined online read; `__call__` then seeds from that read, or reads the one
    row itself when it was not prefetched.  The state then lives in Bytewax (and its recovery
    snapshots).  A prefetched row is only used for a user the flow has no state for, so no
    write of this flow can have happened between the read and its use.  Rows prefetched but
    never used (users whose state came back from a snapshot) are dropped once `max_cached`
    rows wait; a dropped row is simply read again if needed.

    After a crash, recovery replays the events since the last snapshot; a user first seen
    after that snapshot may already have a row online written by the crashed worker, holding
    the very event being replayed.  Then only the part of the row before that event is the
    state to continue from (see `row_before`): the replay rebuilds the rest, row for row.
    """

    def __init__(self, repo_path: Path, max_cached: int = 100_000) -> None:
        self._repo_path = repo_path
        self._ready = False
        self._max_cached = max_cached
        self._asked: set[str] = set()
        self._cached: dict[str, tuple[dict[str, Any], int] | None] = {}

    def _open(self) -> None:
        from feast import FeatureStore
        from feast.infra.online_stores.helpers import (
            compute_versioned_name,
            get_online_store_from_config,
        )
        from feast.infra.online_stores.redis import RedisOnlineStoreConfig, RedisType

        from feature_repo.materialization import redis_client
        from feature_repo.redis_wire import field_name, string_key_encoder

        store = FeatureStore(repo_path=str(self._repo_path))
        config = self._config = store.config
        self._view = store.get_feature_view(VELOCITY_VIEW)
        self._online = get_online_store_from_config(config.online_store)
        self._redis: tuple[Any, Callable[[str], bytes], list[bytes]] | None = None
        online = config.online_store
        encode = string_key_encoder("user_id", config.entity_key_serialization_version,
                                    config.project.encode())
        if (isinstance(online, RedisOnlineStoreConfig) and online.redis_type == RedisType.redis
                and encode is not None and [e.name for e in self._view.entity_columns]
                == ["user_id"]):
            name = compute_versioned_name(
                self._view, config.registry.enable_online_feature_view_versioning)
            fields = [field_name(name, f) for f in ROW_FIELDS] + [f"_ts:{name}".encode()]
            self._redis = (redis_client(online.connection_string, SEED_TIMEOUT_S), encode,
                           fields)
        self._ready = True

    def read(self, user_ids: list[str]) -> list[tuple[dict[str, Any], int] | None]:
        """Stored (row, row time in us) of each user, None if absent: one online read.

        On a plain Redis online store: one pipelined HMGET per user of the hash Feast's
        RedisOnlineStore writes, decoded as `online_read` decodes it (a quarter of its cost:
        seeding ran at the start of every live flow, for each user it had not seen);
        elsewhere through the online store's `online_read`.
        """
        if not self._ready:
            self._open()
        if self._redis is None:
            return self.read_through_feast(user_ids)
        from feast.protos.feast.types.Value_pb2 import Value
        from google.protobuf.timestamp_pb2 import Timestamp

        from feature_repo.redis_wire import to_python

        client, encode, fields = self._redis
        with client.pipeline(transaction=False) as pipe:
            for u in user_ids:
                pipe.hmget(encode(u), fields)
            replies = pipe.execute()
        out: list[tuple[dict[str, Any], int] | None] = []
        for reply in replies:
            ts = Timestamp.FromString(reply[-1]) if reply[-1] else None
            if ts is None or ts.seconds < _YEAR_2000_S:  # as `read_through_feast`
                out.append(None)
                continue
            row = {f: to_python(Value.FromString(raw)) if raw else None
                   for f, raw in zip(ROW_FIELDS, reply, strict=False)}
            out.append((row, ts.seconds * 1_000_000 + ts.nanos // 1000))
        return out

    def read_through_feast(self, user_ids: list[str]) -> list[tuple[dict[str, Any], int] | None]:
        """`read` through the online store's `online_read` (any online store)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type

        if not self._ready:
            self._open()
        keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)])
                for u in user_ids]
        out: list[tuple[dict[str, Any], int] | None] = []
        for ts, values in self._online.online_read(self._config, self._view, keys,
                                                   list(ROW_FIELDS)):
            if ts is None or not values or ts.year < 2000:  # Feast answers 1970 for unknown keys
                out.append(None)
                continue
            row = {f: feast_value_type_to_python_type(values[f]) for f in ROW_FIELDS
                   if f in values}
            out.append((row, to_micros(ts)))
        return out

    def prefetch(self, user_ids: Iterable[str]) -> None:
        """Read, in one round trip, the rows of the users not asked about before."""
        new = [u for u in dict.fromkeys(user_ids) if u not in self._asked]
        if not new:
            return
        self._asked.update(new)
        if len(self._cached) + len(new) > self._max_cached:
            self._cached.clear()
        self._cached.update(zip(new, self.read(new), strict=True))

    def __call__(
        self, user_id: str, first: TransactionEvent | None = None
    ) -> UserVelocityState | None:
        stored = self._cached.pop(user_id, _UNREAD)
        if stored is _UNREAD:
            self._asked.add(user_id)
            (stored,) = self.read([user_id])
        if stored is None:
            return None
        row, row_ts_us = stored
        seed = (row, row_ts_us) if first is None else row_before(row, row_ts_us, first)
        return None if seed is None else UserVelocityState.from_row(*seed)


def row_before(
    row: dict[str, Any], row_ts_us: int, event: TransactionEvent
) -> tuple[dict[str, Any], int] | None:
    """`row` as it was before `event`, if it already holds `event` (same time, amount and
    merchant); else `row` unchanged.  None when nothing came before it.

    Exact unless events were evicted between then and the row's time (24 h horizon, merchant
    LRU), which a crash-and-replay window of seconds does not reach.
    """
    t = to_micros(event.event_timestamp)
    recent = list(zip(row.get("recent_txn_ts") or [], row.get("recent_amounts") or [],
                      row.get("recent_merchants") or [], strict=True))
    hit = next((i for i, (ts, amount, merchant) in enumerate(recent)
                if ts == t and amount == event.amount and merchant == event.merchant_id), None)
    if hit is None:
        return row, row_ts_us
    if hit == 0:
        return None
    kept = recent[:hit]
    seen = {m for _, _, m in kept}
    known = [(m, first) for m, first in zip(row.get("known_merchants") or [],
                                            row.get("known_merchant_first_ts") or [], strict=True)
             if first < t or m in seen]
    before = {
        "recent_txn_ts": [ts for ts, _, _ in kept],
        "recent_amounts": [a for _, a, _ in kept],
        "recent_merchants": [m for _, _, m in kept],
        "known_merchants": [m for m, _ in known],
        "known_merchant_first_ts": [first for _, first in known],
    }
    return before, kept[-1][0]


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
            state, outcome = update_velocity(state, env)
            if outcome is not None:
                out.append(outcome)
        self._state = state
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


ShardSnapshot = dict[str, StateSnapshot]  # user_id -> `UserVelocityState.snapshot()`


class ShardLogic(StatefulBatchLogic[Envelope, VelocityRow | DeadLetter, ShardSnapshot]):
    """The "velocity" step for one shard of users (`user_shard`): a `UserVelocityState` per
    user, each updated exactly as `VelocityLogic` updates its one user.

    Why shards: Bytewax's cost is per key, not per event.  Keyed by user, each micro-batch of
    2,000 events over 20,000 users called `on_batch` about 1,900 times with one event, and each
    epoch snapshotted (called, pickled, stored in SQLite) every user touched in it: about a
    quarter of the worker's CPU, and a 0.3-0.4 s stall at every epoch.  With a few hundred
    shards both costs are per shard.

    Snapshots stay incremental per user: a user's pickled state is cached and re-pickled only
    if an event reached it since the last snapshot; the shard's snapshot is a dict of those
    bytes.  Restored users are unpickled when their next event arrives.  Trade-off: every
    snapshot of a shard writes all of its users' bytes, so recovery storage written per epoch
    grows with users per shard (`fraud_stream_snapshot_users_total` counts the user states
    written); raise `state_shards` for very large user bases, or set 0 for one key per user.
    """

    def __init__(self, seed: Seeder | None, pickled: ShardSnapshot | None) -> None:
        self._seed = seed
        self._users: dict[str, UserVelocityState] = {}
        self._pickled: ShardSnapshot = dict(pickled or {})
        self._dirty: set[str] = set()

    def on_batch(self, values: list[Envelope]) -> tuple[list[VelocityRow | DeadLetter], bool]:
        users, dirty, out = self._users, self._dirty, []
        for env in values:
            uid = env.event.user_id
            state = users.get(uid)
            if state is None:
                snap = self._pickled.get(uid)
                if snap is not None:
                    state = UserVelocityState.restore(snap)
                elif self._seed is not None:
                    state = self._seed(uid, env.event)
            state, outcome = update_velocity(state, env)
            users[uid] = state
            dirty.add(uid)
            if outcome is not None:
                out.append(outcome)
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> ShardSnapshot:
        pickled, users = self._pickled, self._users
        for uid in self._dirty:
            pickled[uid] = users[uid].snapshot()
        self._dirty.clear()
        metrics.SNAPSHOT_USERS.inc(len(pickled))
        return dict(pickled)  # bytes are immutable: a shallow copy is an immutable snapshot


def shard_keys(shards: int) -> list[str]:
    """The shard keys, zero-padded so they sort in shard order."""
    width = len(str(max(shards - 1, 0)))
    return [str(i).zfill(width) for i in range(shards)]


def user_shard(keys: list[str], env: Envelope) -> str:
    """The shard key of the event's user (stable across processes: crc32, not `hash`)."""
    return keys[zlib.crc32(env.event.user_id.encode()) % len(keys)]


def update_velocity(
    state: UserVelocityState | None, env: Envelope
) -> tuple[UserVelocityState, Outcome]:
    """Apply one event to its user's state: a new row, a 'late' dead letter, or None (dup)."""
    state = state or UserVelocityState()
    e = env.event
    try:
        row = state.apply(e.transaction_id, to_micros(e.event_timestamp), e.amount, e.merchant_id)
    except LateEventError as exc:
        LATE.inc()
        return state, DeadLetter(f"late: {exc}", e.model_dump_json().encode(), e.user_id.encode(),
                                 env.origin)
    if row is None:
        DUPLICATE.inc()
        return state, None
    APPLIED.inc()
    return state, VelocityRow(e.user_id, row, env.produced_at)


def key_batch(
    key_of: Callable[[Envelope], str], prefetch: Callable[[Iterable[str]], None] | None,
    batch: list[Envelope],
) -> list[tuple[str, Envelope]]:
    """The "key" step: `seed.prefetch` the batch's users (when the seed has it), then key each
    event by `key_of` (its user's shard, or its user)."""
    if prefetch is not None:
        prefetch(env.event.user_id for env in batch)
    return [(key_of(env), env) for env in batch]


def _parse_batch(max_future_s: float, items: list[Any]) -> list[Envelope | DeadLetter]:
    now_s = time.time()  # one wall clock per micro-batch
    return [parse_item(item, now_s, max_future_s) for item in items]


def _user_of(env: Envelope) -> str:
    return env.event.user_id


def _rows_by_user(batch: list[tuple[str, Outcome]]) -> list[tuple[str, VelocityRow]]:
    return [(out.user_id, out) for _, out in batch if isinstance(out, VelocityRow)]


def _dead_letters(batch: list[tuple[str, Outcome]]) -> list[DeadLetter]:
    return [out for _, out in batch if isinstance(out, DeadLetter)]


def _is_envelope(x: Envelope | DeadLetter) -> bool:
    if isinstance(x, DeadLetter):
        (FUTURE if x.reason.startswith("future:") else INVALID).inc()
        return False
    return True


def build_flow(
    source: Source[Any],
    sink: Sink[tuple[str, VelocityRow]],
    dlq_sink: Sink[DeadLetter],
    flow_id: str = "user_velocity",
    seed: Seeder | None = None,
    state_shards: int = DEFAULT_STATE_SHARDS,
    state_step: str | None = None,
    max_future_s: float | None = None,
) -> Dataflow:
    """Events from `source` -> (user_id, VelocityRow) into `sink`; DeadLetters into `dlq_sink`.

    `seed(user_id, event)` gives the state a user starts from when the flow first sees it, at
    `event` (the live flow reads the online store; the backfill and tests start from nothing).
    `max_future_s` bounds event time ahead of the reference clock (default:
    `FRAUD_MAX_FUTURE_SECONDS`, read when the flow is built; see "Future events" above).
    A seed with a `prefetch(user_ids)` method is given each micro-batch's users first, so it
    can read their rows in one round trip.

    Per-user state is keyed by `state_shards` shards of users (`ShardLogic`), or by user when
    0 (`VelocityLogic`).  The step id (`state_step`, by default "velocity_256shards" or
    "velocity") names the layout, so recovery never hands a shard the snapshot of another
    layout: after a change of `state_shards` the flow resumes its input offsets and seeds every
    user afresh from the online store, as after a crash (the live worker takes its id from
    `state_step_id`, which also never returns to a stale layout's snapshots).
    """
    flow = Dataflow(flow_id)
    raw = op.input("in", flow, source)
    # Batch-wise steps: one Python call per micro-batch instead of one per event (Bytewax's
    # per-item calls of `map`/`key_on` cost more than the small functions they ran).
    bound = max_future_seconds() if max_future_s is None else max_future_s
    parsed = op.flat_map_batch("parse", raw, partial(_parse_batch, bound))
    valid = op.branch("valid", parsed, _is_envelope)
    key_of = partial(user_shard, shard_keys(state_shards)) if state_shards > 0 else _user_of
    keyed = op.flat_map_batch("key", valid.trues,
                              partial(key_batch, key_of, getattr(seed, "prefetch", None)))
    # One type over both builders, so mypy can bind `stateful_batch`'s type parameters: their
    # snapshot types differ, and Bytewax's `W` is invariant (the next steps take `Outcome`s).
    logic: Callable[[Any], StatefulBatchLogic[Envelope, Any, Any]] = partial(
        ShardLogic if state_shards > 0 else velocity_logic, seed)
    outcomes = op.stateful_batch(state_step or _plain_step_id(state_shards), keyed, logic)
    rows = op.flat_map_batch("new_rows", outcomes, _rows_by_user)  # the sink's key: the user
    late = op.flat_map_batch("late", outcomes, _dead_letters)
    op.output("rows", rows, sink)
    # `_is_envelope` is false only for DeadLetters (a plain bool, not a TypeGuard for them)
    op.output("dlq", op.merge("dead", cast(Stream[DeadLetter], valid.falses), late), dlq_sink)
    return flow


def kafka_source(bootstrap: str, topic: str, tail: bool) -> KafkaInput:
    """The live flow's Kafka input (batch size, fetch wait and offset-reset policy from
    `StreamingSettings`; see `streaming.kafka_input.KafkaInput` for lost logs).

    `fetch.wait.max.ms` bounds how long the broker may hold a fetch while it has less than
    `fetch.min.bytes` (1) to answer with: librdkafka's 500 ms default added 130-260 ms to every
    event's latency against the Tansu broker, which holds fetches for that long.
    """
    from streaming.config import get_settings

    s = get_settings()
    return KafkaInput(bootstrap, topic, tail=tail, batch_size=s.source_batch_size,
                      offset_reset=s.offset_reset,
                      add_config={"socket.keepalive.enable": "true",
                                  "fetch.wait.max.ms": str(s.source_fetch_wait_ms)})


def get_flow(state_step: str | None = None) -> Dataflow:
    """The live flow: Kafka `transactions` -> Feast online store + offline history + DLQ
    (`state_step`: the velocity step's id, see `state_step_id`)."""
    from feature_repo.paths import velocity_history_dir
    from scoring.topics import TRANSACTIONS, TRANSACTIONS_DLQ
    from streaming.config import get_settings
    from streaming.sources import KafkaDeadLetterSink
    from streaming.velocity_sink import VelocitySink

    s = get_settings()
    source = kafka_source(s.bootstrap_servers, TRANSACTIONS, tail=s.tail)
    sink = VelocitySink(s.feature_repo, velocity_history_dir(), prefix="stream")
    dlq = KafkaDeadLetterSink(s.bootstrap_servers, TRANSACTIONS_DLQ, s.dlq_retry_s)
    return build_flow(source, sink, dlq, seed=OnlineStateSeeder(s.feature_repo),
                      state_shards=s.state_shards, state_step=state_step,
                      max_future_s=s.max_future_seconds)


LAYOUT_FILE = "velocity_layout.json"


def state_step_id(recovery_dir: Path, shards: int) -> str:
    """The velocity step's id for the state layout `shards`, never one of a stale state.

    Bytewax keeps the snapshots of every step id it has seen in the recovery directory.  A
    layout used, left, and used again would find the snapshots it left behind, older than the
    online rows written since, and continue from them.  So each change of layout starts a new
    generation (`LAYOUT_FILE` in the recovery directory) with step ids of its own; generation
    0 keeps the plain ids ("velocity" is what a recovery directory of the per-user layout from
    before shards holds, and it continues from it).
    """
    layout = f"{shards}shards" if shards else "per-user"
    marker = recovery_dir / LAYOUT_FILE
    generation = 0
    if marker.exists():
        last = json.loads(marker.read_text())
        generation = int(last["generation"]) + (last["layout"] != layout)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"layout": layout, "generation": generation}))
    tmp.replace(marker)
    return _plain_step_id(shards) if generation == 0 else f"velocity_{layout}_g{generation}"


def _plain_step_id(shards: int) -> str:
    """The velocity step's id in generation 0 of layout `shards` (see `state_step_id`)."""
    return f"velocity_{shards}shards" if shards else "velocity"


GC_THRESHOLDS = (100_000, 50, 100)  # generation 0 allocations, then collections of 0 and 1


def tune_gc() -> None:
    """After start-up: freeze the heap and collect the young generation less often.

    Start-up objects never need collecting (`gc.freeze`).  Per event the flow allocates many
    short-lived, acyclic objects while the per-user states are long lived: at the default
    thresholds (700, 10, 10) the collections, rescanning the states again and again, took
    about a third of the worker's CPU (300,000 events of 20,000 users).  Cycles are still
    collected, only in larger steps.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main() -> None:
    """Run the live flow on one worker with recovery, metrics and a frozen heap."""
    from datetime import timedelta

    from bytewax._bytewax import cli_main
    from bytewax.recovery import RecoveryConfig, init_db_dir

    from streaming.config import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = get_settings()
    metrics.start_metrics_server(s.metrics_host, s.metrics_port)
    if not any(s.recovery_dir.glob("part-*.sqlite3")):
        s.recovery_dir.mkdir(parents=True, exist_ok=True)
        init_db_dir(s.recovery_dir, s.recovery_partitions)
    step = state_step_id(s.recovery_dir, s.state_shards)
    flow = get_flow(step)
    tune_gc()
    log.info("feature dataflow: %s -> online store + history; state step %s",
             s.bootstrap_servers, step)
    cli_main(
        flow,
        workers_per_process=1,
        epoch_interval=timedelta(seconds=s.snapshot_interval_s),
        recovery_config=RecoveryConfig(
            str(s.recovery_dir), backup_interval=timedelta(seconds=s.backup_interval_s)
        ),
    )


if __name__ == "__main__":
    main()
