"""The user-velocity feature dataflow factory: events in, velocity rows out, bad events to the DLQ.

`build_flow(source, sink, dlq_sink)` is the one factory: the live worker wires it to Kafka and
Feast (`streaming.features`), the backfill to the parquet log and the offline history, tests
to in-memory sources and sinks.  The flow itself adds no delivery guarantee of its own: the
steps are deterministic and the state updates idempotent by `transaction_id`
(`streaming.state`), so with an at-least-once source and sinks idempotent by key, a replay
rebuilds the same rows (exactly-once effect).

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

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink

from feature_repo.contract import TransactionEvent, max_future_seconds
from streaming import metrics
from streaming.config import DEFAULT_STATE_SHARDS
from streaming.events import DeadLetter, Envelope, future_reason, parse
from streaming.recovery import plain_step_id
from streaming.state import (
    Outcome,
    Seeder,
    ShardLogic,
    grouped_logic,
    shard_keys,
    user_shard,
    velocity_logic,
)
from streaming.velocity_sink import VelocityRow

INVALID, FUTURE = (metrics.EVENTS.labels(o) for o in ("invalid", "future"))


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
    """`future_reason`, with a float fast path for the events clearly within the bound (the
    common case, where building the exact reason would be wasted)."""
    if event.event_timestamp.timestamp() < ref_s + bound_s - 0.001:
        return None
    return future_reason(event, ref_s, bound_s)


def key_batch(
    key_of: Callable[[Envelope], str], prefetch: Callable[[Iterable[str]], None] | None,
    batch: list[Envelope | DeadLetter],
) -> list[tuple[str, list[Envelope]]]:
    """The "key" step: the batch's events (its dead letters are the "invalid" step's),
    `seed.prefetch` their users (when the seed has it), then grouped by `key_of` (their user's
    shard, or their user): one item per key, its events in batch order (`GroupedLogic`)."""
    groups: dict[str, list[Envelope]] = {}
    for x in batch:
        if isinstance(x, Envelope):
            key = key_of(x)
            group = groups.get(key)
            if group is None:
                groups[key] = [x]
            else:
                group.append(x)
    if prefetch is not None and groups:
        prefetch(env.event.user_id for group in groups.values() for env in group)
    return list(groups.items())


def _invalid(batch: list[Envelope | DeadLetter]) -> list[DeadLetter]:
    """The "invalid" step: the batch's dead letters (unparseable, invalid or future), counted."""
    dead = [x for x in batch if isinstance(x, DeadLetter)]
    if dead:
        future = sum(1 for d in dead if d.reason.startswith("future:"))
        if future:
            FUTURE.inc(future)
        if len(dead) > future:
            INVALID.inc(len(dead) - future)
    return dead


def _parse_batch(max_future_s: float, items: list[Any]) -> list[Envelope | DeadLetter]:
    now_s = time.time()  # one wall clock per micro-batch
    return [parse_item(item, now_s, max_future_s) for item in items]


def _user_of(env: Envelope) -> str:
    return env.event.user_id


def _rows_by_user(batch: list[tuple[str, Outcome]]) -> list[tuple[str, VelocityRow]]:
    return [(out.user_id, out) for _, out in batch if isinstance(out, VelocityRow)]


def _dead_letters(batch: list[tuple[str, Outcome]]) -> list[DeadLetter]:
    return [out for _, out in batch if isinstance(out, DeadLetter)]


def build_flow(
    source: Source[Any],
    sink: Sink[tuple[str, VelocityRow]],
    dlq_sink: Sink[DeadLetter],
    flow_id: str = "user_velocity",
    seed: Seeder | None = None,
    state_shards: int = DEFAULT_STATE_SHARDS,
    state_step: str | None = None,
    max_future_s: float | None = None,
    prefetch_when_keyed: bool = True,
) -> Dataflow:
    """Events from `source` -> (user_id, VelocityRow) into `sink`; DeadLetters into `dlq_sink`.

    `seed(user_id, event)` gives the state a user starts from when the flow first sees it, at
    `event` (the live flow reads the online store; the backfill and tests start from nothing).
    `max_future_s` bounds event time ahead of the reference clock (default:
    `FRAUD_MAX_FUTURE_SECONDS`, read when the flow is built; see "Future events" above).
    A seed with a `prefetch(user_ids)` method is given each micro-batch's users first, so it
    can read their rows in one round trip: where the batch is keyed (`prefetch_when_keyed`,
    right with one worker), or else, for the users new to it, in each state shard
    (`ShardLogic`; with several workers a shard usually lives on another worker than the one
    that keyed).

    Per-user state is keyed by `state_shards` shards of users (`ShardLogic`), or by user when
    0 (`VelocityLogic`).  The step id (`state_step`, by default "velocity_256shards" or
    "velocity") names the layout, so recovery never hands a shard the snapshot of another
    layout: after a change of `state_shards` the flow resumes its input offsets and seeds every
    user afresh from the online store, as after a crash (the live worker takes its id from
    `streaming.recovery.state_step_id`, which also never returns to a stale layout's snapshots).
    """
    flow = Dataflow(flow_id)
    raw = op.input("in", flow, source)
    # Batch-wise steps: one Python call per micro-batch instead of one per event (Bytewax's
    # per-item calls of `map`/`key_on` cost more than the small functions they ran).
    bound = max_future_seconds() if max_future_s is None else max_future_s
    parsed = op.flat_map_batch("parse", raw, partial(_parse_batch, bound))
    # Two batch-wise steps rather than `op.branch`, which calls its predicate once per item.
    invalid = op.flat_map_batch("invalid", parsed, _invalid)
    key_of = partial(user_shard, shard_keys(state_shards)) if state_shards > 0 else _user_of
    prefetch = getattr(seed, "prefetch", None) if prefetch_when_keyed else None
    keyed = op.flat_map_batch("key", parsed, partial(key_batch, key_of, prefetch))
    # The shards prefetch their new users only where the key step does not.
    shard_logic = partial(ShardLogic, prefetch=prefetch is None)
    # One type over both builders, so mypy can bind `stateful_batch`'s type parameters: their
    # snapshot types differ, and Bytewax's `W` is invariant (the next steps take `Outcome`s).
    logic: Callable[[Any], StatefulBatchLogic[list[Envelope], Any, Any]] = partial(
        grouped_logic, shard_logic if state_shards > 0 else velocity_logic, seed)
    outcomes = op.stateful_batch(state_step or plain_step_id(state_shards), keyed, logic)
    rows = op.flat_map_batch("new_rows", outcomes, _rows_by_user)  # the sink's key: the user
    late = op.flat_map_batch("late", outcomes, _dead_letters)
    op.output("rows", rows, sink)
    op.output("dlq", op.merge("dead", invalid, late), dlq_sink)
    return flow
