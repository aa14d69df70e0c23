"""Per-user velocity state and the windowed features computed from it (engine-free).

The *same* code runs in three places:

* `UserVelocityState.apply` in the live Bytewax dataflow and in the historical backfill, which
  turns each transaction into a row of the `user_velocity_fv` feature view;
* `window_features` in the `user_velocity_odfv` on-demand view, which Feast runs for training
  (`get_historical_features`) and which the scorer runs online.

Semantics, for a transaction of user u at time t: only u's transactions strictly before t
count (the transaction being scored never counts itself), windows are half-open [t - w, t), and
the answer is correct as of t however long ago u's last event was, because the window is taken
at request time from raw event times stored in the row, not precomputed at write time.

Bounds: a state keeps every event within `HORIZON_US` of its newest event, plus the latest event
before that horizon (so "seconds since last transaction" stays exact), at most `MAX_EVENTS`
events (oldest dropped first) and at most `MAX_KNOWN_MERCHANTS` merchants (least recently used
dropped first).  Beyond those bounds counts saturate; training and serving see the same values.
"""

from __future__ import annotations

import bisect
import marshal
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

# What a state's `snapshot()` returns and `restore` takes: its fields, marshalled (or pickled).
StateSnapshot = bytes

MINUTE_US = 60_000_000
HOUR_US = 60 * MINUTE_US
HORIZON_US = 24 * HOUR_US
# Behind the user's newest event, which the contract's future bound (FRAUD_MAX_FUTURE_SECONDS,
# 300 s) keeps near real time: that bound must stay below this (tests/integration/streaming/test_stream_safety.py).
ALLOWED_LATENESS_US = 10 * MINUTE_US
MAX_EVENTS = 1024
MAX_KNOWN_MERCHANTS = 256
_MARSHAL_VERSION = 4  # of `snapshot`s: read by every Python 3 since 3.4

# Feature names of the velocity feature view (arrays of raw recent events) ...
ROW_FIELDS = (
    "recent_txn_ts",
    "recent_amounts",
    "recent_merchants",
    "known_merchants",
    "known_merchant_first_ts",
)
# ... and of the on-demand features computed from them at request time.
WINDOW_FEATURES = (
    "user_txn_count_10m",
    "user_txn_count_1h",
    "user_amount_sum_1h",
    "user_distinct_merchants_24h",
    "user_seconds_since_last_txn",
    "user_is_new_merchant",
)


class LateEventError(ValueError):
    """The event is older than the allowed lateness behind the user's newest event."""


@dataclass
class UserVelocityState:
    """Recent events of one user, sorted by event time (epoch microseconds).

    `apply` is idempotent by `transaction_id`: a transaction already in the state changes
    nothing and returns None, so replays after a restart count nothing twice.
    """

    ts: list[int] = field(default_factory=list)
    amounts: list[float] = field(default_factory=list)
    merchants: list[str] = field(default_factory=list)
    txn_ids: list[str] = field(default_factory=list)
    # merchant -> (first_seen_us, last_seen_us), insertion order irrelevant
    known: dict[str, tuple[int, int]] = field(default_factory=dict)
    last_row_ts: int = 0
    # Seeded from a stored row (no transaction ids): events at or before this time may already
    # be counted in it, so they are refused as late instead of risking a double count.
    seeded_until: int = 0
    # (sorted known merchants, their first-seen times) for `row`, None when stale (kept up to
    # date by `apply`, dropped by an eviction); not a field
    _known_row = None
    # Whether every value is an exact int, float or str in exact lists, dicts and tuples, which
    # `marshal` round-trips exactly (see `snapshot`); not a field
    _plain = True
    # set(txn_ids) for `apply`'s duplicate check, built on first use (None: not built); kept
    # equal to set(txn_ids) by `apply` and `_evict`; not a field, not in snapshots.  A hash
    # lookup instead of a scan that compares (and reaches in memory) every id (issue 20)
    _ids = None

    def __post_init__(self) -> None:
        self._plain = self._values_are_plain()

    def _values_are_plain(self) -> bool:
        known = self.known
        return (
            type(self.ts) is list and type(self.amounts) is list and type(self.merchants) is list
            and type(self.txn_ids) is list and type(known) is dict
            and type(self.last_row_ts) is int and type(self.seeded_until) is int
            and all(type(t) is int for t in self.ts)
            and all(type(a) is float for a in self.amounts)
            and all(type(m) is str for m in self.merchants)
            and all(type(i) is str for i in self.txn_ids)
            and all(type(m) is str and type(v) is tuple and len(v) == 2 and type(v[0]) is int
                    and type(v[1]) is int for m, v in known.items())
        )

    def apply(
        self, txn_id: str, ts_us: int, amount: float, merchant_id: str
    ) -> dict[str, Any] | None:
        """Add one transaction; return the new feature row, or None for a duplicate.

        Raises LateEventError when `ts_us` lies more than `ALLOWED_LATENESS_US` behind the
        newest event already applied (the caller routes it to the dead-letter topic).
        """
        ids = self._ids
        if ids is None:
            ids = self._ids = set(self.txn_ids)
        if txn_id in ids:
            return None
        if self._plain and not (type(ts_us) is int and type(amount) is float
                                and type(txn_id) is str and type(merchant_id) is str):
            self._plain = False  # a numpy value, say: `snapshot` pickles this state
        if ts_us <= self.seeded_until:
            raise LateEventError(
                "event is not newer than the stored state this worker continued from; it may "
                "already be counted"
            )
        if self.ts and ts_us < self.ts[-1] - ALLOWED_LATENESS_US:
            raise LateEventError(
                f"event is {(self.ts[-1] - ts_us) / 1e6:.0f}s behind the user's newest event; "
                f"allowed lateness is {ALLOWED_LATENESS_US / 1e6:.0f}s"
            )
        i = bisect.bisect_right(self.ts, ts_us)
        self.ts.insert(i, ts_us)
        self.amounts.insert(i, amount)
        self.merchants.insert(i, merchant_id)
        self.txn_ids.insert(i, txn_id)
        ids.add(txn_id)
        seen = self.known.get(merchant_id)
        cached = self._known_row
        if seen is None:
            self.known[merchant_id] = (ts_us, ts_us)
            if cached is not None:  # kept sorted in place rather than sorted again in `row`
                j = bisect.bisect_left(cached[0], merchant_id)
                cached[0].insert(j, merchant_id)
                cached[1].insert(j, ts_us)
        else:
            first, last = seen
            if ts_us < first and cached is not None:
                cached[1][bisect.bisect_left(cached[0], merchant_id)] = ts_us
            self.known[merchant_id] = (min(first, ts_us), max(last, ts_us))
        self._evict()
        # Row timestamps strictly increase per user: online stores ignore a write that is not
        # newer than the stored one, and the offline join must find one row per instant.
        self.last_row_ts = max(self.ts[-1], self.last_row_ts + 1)
        return self.row()

    @classmethod
    def from_row(cls, row: dict[str, Any], row_ts_us: int) -> UserVelocityState:
        """Continue from a stored feature row (written by the backfill or an earlier stream).

        Transaction ids are not stored in rows, so events at or before the row's newest event
        are refused as late (`seeded_until`): never counted twice, at the price of refusing a
        genuinely late event that arrives right after a worker first sees the user.  A merchant's last-seen time is its latest recent event, or its
        first-seen time when that event has been evicted.
        """
        state = cls(
            ts=list(row.get("recent_txn_ts") or []),
            amounts=[float(a) for a in row.get("recent_amounts") or []],
            merchants=list(row.get("recent_merchants") or []),
            last_row_ts=row_ts_us,
        )
        state.txn_ids = [""] * len(state.ts)
        state.seeded_until = state.ts[-1] if state.ts else 0
        for m, first in zip(row.get("known_merchants") or [],
                            row.get("known_merchant_first_ts") or [], strict=True):
            state.known[m] = (first, first)
        for t, m in zip(state.ts, state.merchants, strict=True):
            if m in state.known:
                first, last = state.known[m]
                state.known[m] = (first, max(last, t))
        state._plain = state._values_are_plain()
        return state

    def snapshot(self) -> StateSnapshot:
        """An immutable copy: the fields serialized as plain builtins (no reference to this
        class), which is all a recovery snapshot needs and cheaper than a deep copy that
        would be serialized afterwards anyway.  `restore` turns it back.

        With `marshal` (format 4, read by every Python 3 since 3.4) when every value is an
        exact int, float or str (`_plain`, the stream's case): about half the CPU of `pickle`
        for these lists, and the stream takes one per user each micro-batch touches
        (docs/benchmarks.md, issue 20).  Otherwise with `pickle`, which keeps other types
        exactly (`marshal` would write a numpy integer as its bytes)."""
        fields = (self.ts, self.amounts, self.merchants, self.txn_ids, self.known,
                  self.last_row_ts, self.seeded_until)
        if self._plain:
            return marshal.dumps(fields, _MARSHAL_VERSION)
        return pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, snap: StateSnapshot) -> UserVelocityState:
        """The state `snapshot()` was taken from: a pickle (as every snapshot was before
        2026-12-05) starts with its PROTO opcode, 0x80; a marshalled tuple never does."""
        if snap[:1] == b"\x80":
            return cls(*pickle.loads(snap))  # noqa: S301 - our own snapshot, from recovery storage
        return cls(*marshal.loads(snap))

    def _evict(self) -> None:
        cutoff = self.ts[-1] - HORIZON_US
        # keep everything >= cutoff plus the latest event before it
        first_kept = max(bisect.bisect_left(self.ts, cutoff) - 1, 0)
        first_kept = max(first_kept, len(self.ts) - MAX_EVENTS)
        if first_kept:
            ids = self._ids
            if ids is not None:
                ids.difference_update(self.txn_ids[:first_kept])
            del self.ts[:first_kept], self.amounts[:first_kept]
            del self.merchants[:first_kept], self.txn_ids[:first_kept]
            if ids is not None and len(ids) != len(self.txn_ids):
                # an evicted id is still held further on (only a seeded state's "" ids repeat):
                # with no repeats, the sizes match exactly when ids == set(txn_ids)
                self._ids = set(self.txn_ids)
        if len(self.known) > MAX_KNOWN_MERCHANTS:
            by_recency = sorted(self.known.items(), key=lambda kv: (kv[1][1], kv[0]))
            for merchant, _ in by_recency[: len(self.known) - MAX_KNOWN_MERCHANTS]:
                del self.known[merchant]
            self._known_row = None

    def __deepcopy__(self, memo: dict[int, Any]) -> UserVelocityState:
        # flat copies, not a walk (`known` holds immutable tuples)
        return UserVelocityState(
            self.ts[:], self.amounts[:], self.merchants[:], self.txn_ids[:], dict(self.known),
            self.last_row_ts, self.seeded_until,
        )

    def row(self) -> dict[str, Any]:
        """The feature-view row for the current state (event time = `last_row_ts`)."""
        known = self._known_row
        if known is None:
            merchants = sorted(self.known)
            known = self._known_row = (merchants, [self.known[m][0] for m in merchants])
        return {
            "row_ts_us": self.last_row_ts,
            "recent_txn_ts": self.ts[:],
            "recent_amounts": self.amounts[:],
            "recent_merchants": self.merchants[:],
            "known_merchants": known[0][:],
            "known_merchant_first_ts": known[1][:],
        }


def window_features(
    recent_txn_ts: list[int] | None,
    recent_amounts: list[float] | None,
    recent_merchants: list[str] | None,
    known_merchants: list[str] | None,
    known_merchant_first_ts: list[int] | None,
    request_ts_us: int,
    merchant_id: str | None,
) -> dict[str, Any]:
    """Velocity features of a transaction at `request_ts_us` from a user's stored row.

    A missing row (unknown user, or a row the TTL rule discarded) means "no earlier
    transactions": counts are 0 and `user_seconds_since_last_txn` is NaN (missing).
    """
    ts = recent_txn_ts or []
    amounts = recent_amounts or []
    merchants = recent_merchants or []
    t = request_ts_us
    end = bisect.bisect_left(ts, t)  # events strictly before t are ts[:end]
    lo_10m = bisect.bisect_left(ts, t - 10 * MINUTE_US, 0, end)
    lo_1h = bisect.bisect_left(ts, t - HOUR_US, 0, end)
    lo_24h = bisect.bisect_left(ts, t - HORIZON_US, 0, end)
    is_new = True
    if known_merchants and merchant_id is not None:
        j = bisect.bisect_left(known_merchants, merchant_id)
        if j < len(known_merchants) and known_merchants[j] == merchant_id:
            is_new = (known_merchant_first_ts or [t])[j] >= t
    return {
        "user_txn_count_10m": end - lo_10m,
        "user_txn_count_1h": end - lo_1h,
        "user_amount_sum_1h": float(sum(amounts[lo_1h:end])),
        "user_distinct_merchants_24h": len(set(merchants[lo_24h:end])),
        "user_seconds_since_last_txn": (t - ts[end - 1]) / 1e6 if end else math.nan,
        "user_is_new_merchant": int(is_new),
    }
