"""Seeding: the state a user continues from when the live flow first sees it, read online.

Without it a live flow would start every user from nothing and overwrite the history the
backfill and `feast materialize` put online.

Guarantees: the seeder only reads.  A row is used only for a user the flow holds no state for
(neither in memory nor in a recovery snapshot), so no write of this flow can fall between the
read and its use.  After a crash, a row the crashed worker wrote may already hold the event
being replayed; the seed is then the row as it was before that event (`row_before`), so the
replay rebuilds the same rows and counts nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from feast import FeatureStore
from feast.infra.online_stores.helpers import get_online_store_from_config
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type

from feature_repo.contract import TransactionEvent, to_micros
from feature_repo.redis_store.client import SyncClient, is_supported, redis_client
from feature_repo.redis_store.reader import HashReader, never_written, read_rows
from feature_repo.redis_store.wire import view_name
from feature_repo.velocity import ROW_FIELDS, UserVelocityState
from streaming.velocity_sink import VELOCITY_VIEW

Stored = tuple[dict[str, Any], int]  # a user's online row and its row time (epoch us)
SEED_TIMEOUT_S = 5.0  # socket timeout of the seeding reads
_UNREAD: Any = object()


class OnlineStateSeeder:
    """First sight of a user in this flow: continue from its row in the online store (a
    `streaming.state.Seeder`).

    `prefetch` (in the flow's "key" step, once per micro-batch) reads the rows of all users of
    the batch it has not been asked about yet in one online read; `__call__` then seeds from
    that read, or reads the one row itself when it was not prefetched.  The state then lives
    in Bytewax (and its recovery snapshots).  Rows prefetched but never used (users whose state
    came back from a snapshot) are dropped once `max_cached` rows wait; a dropped row is simply
    read again if needed.  The feature store is opened on the first read, not at construction.
    """

    def __init__(self, repo_path: Path, max_cached: int = 100_000) -> None:
        self._repo_path = repo_path
        self._ready = False
        self._max_cached = max_cached
        self._asked: set[str] = set()
        self._cached: dict[str, Stored | None] = {}
        self._redis_checked = False
        self._redis: tuple[SyncClient, HashReader] | None = None

    def _open(self) -> None:
        store = FeatureStore(repo_path=str(self._repo_path))
        self._config = store.config
        self._view = store.get_feature_view(VELOCITY_VIEW)
        self._online = get_online_store_from_config(self._config.online_store)
        self._ready = True

    def read(self, user_ids: list[str]) -> list[Stored | None]:
        """Stored (row, row time in us) of each user, None if absent: one online read (directly
        from Redis on a Redis online store, node or cluster, else through Feast's
        `online_read`)."""
        if not self._ready:
            self._open()
        rows = self._read_redis(user_ids)
        return self.read_through_feast(user_ids) if rows is None else rows

    def read_through_feast(self, user_ids: list[str]) -> list[Stored | None]:
        """`read` through the online store's `online_read` (any online store; row times to the
        second, as Feast keeps them)."""
        if not self._ready:
            self._open()
        keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)])
                for u in user_ids]
        out: list[Stored | None] = []
        for ts, values in self._online.online_read(self._config, self._view, keys,
                                                   list(ROW_FIELDS)):
            if ts is None or never_written(ts) or not values:  # the one never-written rule
                out.append(None)
                continue
            row = {f: feast_value_type_to_python_type(values[f]) for f in ROW_FIELDS
                   if f in values}
            out.append((row, to_micros(ts)))
        return out

    # --- Redis access: the seeder's only Redis-specific code, all in this one method ----------
    def _read_redis(self, user_ids: list[str]) -> list[Stored | None] | None:
        """`read` straight from Redis (`feature_repo.redis_store.reader`: one pipelined HMGET
        per user of the hash Feast's RedisOnlineStore writes, decoded as its `online_read`
        decodes it, with the row time to the microsecond, and its rule for a user never
        written).  None (nothing read) unless the online store is Redis (node or cluster)
        and the view's only join key is `user_id`: `read` then goes through Feast.  Connects
        on the first call."""
        if not self._redis_checked:
            self._redis_checked = True
            config, view = self._config, self._view
            if (is_supported(config.online_store)
                    and [e.name for e in view.entity_columns] == ["user_id"]):
                hashes = HashReader(config, "user_id", [(view_name(view, config), ROW_FIELDS)])
                client = redis_client(config.online_store, socket_timeout_s=SEED_TIMEOUT_S)
                self._redis = (client, hashes)
        if self._redis is None:
            return None
        client, hashes = self._redis
        (rows,) = read_rows(client, [(hashes, user_ids)])
        return [None if row is None else (row.python(), row.micros) for row, in rows]

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
        """The state `user_id` continues from at its `first` event in this flow (None: start
        empty): the stored row, as it was before `first` if it already holds it."""
        stored = self._cached.pop(user_id, _UNREAD)
        if stored is _UNREAD:
            self._asked.add(user_id)
            (stored,) = self.read([user_id])
        if stored is None:
            return None
        row, row_ts_us = stored
        seed = (row, row_ts_us) if first is None else row_before(row, row_ts_us, first)
        return None if seed is None else UserVelocityState.from_row(*seed)


def row_before(row: dict[str, Any], row_ts_us: int, event: TransactionEvent) -> Stored | None:
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
