"""Online feature vectors through a model's feature service, with training's rules.

Built once at start-up from the registry: which feature views to read, with which entity keys
and TTLs, and which on-demand transformations (the registry's own UDFs, the functions training
ran through `get_historical_features`) turn them into model inputs.

Per request: on a Redis online store (node or cluster) one pipelined HMGET per entity for all
its feature views (`RedisFeatureReader`, through `feature_repo.redis_store.reader`); on any
other store Feast's public `online_read[_async]`, one call per view.  Then the TTL rule of Feast's offline
point-in-time join, which Feast does *not* apply online: a stored row is used only if
`t - ttl <= row_ts <= t` for the transaction's time `t`; otherwise its features are missing,
exactly as in the training frame, and counted as stale (a key never written for the view,
`redis_store.reader.never_written`, is missing but not stale).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from feast import FeatureStore, FeatureView
from feast.infra.online_stores.helpers import get_online_store_from_config
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType

from feature_repo.redis_store.client import async_redis_client, is_supported
from feature_repo.redis_store.reader import (
    HashReader,
    Replies,
    ViewColumns,
    never_written,
    read_replies_async,
)
from feature_repo.redis_store.wire import to_python, view_name

Row = dict[str, Any]
# Stored rows per view, in one of two forms: Feast's `online_read` form, per entity row (row
# time, values) or (None, None) when none, the time a datetime and the values ValueProtos by
# feature; or `RedisFeatureReader`'s columns (`redis_store.reader.ViewColumns`): each entity
# row's exact epoch microseconds (None when no row) and, per feature in the view's order, the
# Python values (no datetime or ValueProto on the hot path).
Fetched = Sequence[Sequence[tuple[datetime | None, Any]] | ViewColumns]


@dataclass
class FeatureVector:
    """Model inputs of one transaction plus what an explanation needs."""

    values: dict[str, Any]
    ages: dict[str, float | None] = field(default_factory=dict)  # stored features only
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    # `values` as the model's float64 row (None as NaN), in the order of `input_names` (the
    # feature service's output), when `OnlineFeatures.assemble` converted them (batches of
    # `_MATRIX_MIN_ROWS` or more, plain numbers): otherwise None, and the model's row is
    # `scoring.scorer.model_row`'s
    inputs: np.ndarray | None = field(default=None, compare=False, repr=False)
    input_names: list[str] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class _ViewRead:
    view: FeatureView
    join_key: str
    features: list[str]
    ttl_us: int | None


def _micros(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000)


class OnlineFeatures:
    """Reads and assembles the feature service's vector for a batch of entity rows."""

    def __init__(self, store: FeatureStore, feature_service: str,
                 lookup_timeout_s: float | None = None) -> None:
        self.store = store
        self.lookup_timeout_s = lookup_timeout_s  # deadline of `fetch_async`, if any
        service = store.get_feature_service(feature_service)
        self.output: list[str] = []
        self._direct: dict[str, list[str]] = {}  # view -> features the model reads directly
        self._odfvs: list[tuple[OnDemandFeatureView, list[str]]] = []
        needed: dict[str, set[str]] = {}
        for proj in service.feature_view_projections:
            names = [f.name for f in proj.features]
            self.output.extend(names)
            try:
                odfv = store.get_on_demand_feature_view(proj.name)
            except Exception:  # noqa: BLE001 - not an on-demand view: a stored one
                odfv = None
            if odfv is None:
                self._direct[proj.name] = names
                needed.setdefault(proj.name, set()).update(names)
                continue
            self._odfvs.append((odfv, names))
            for src in odfv.source_feature_view_projections.values():
                needed.setdefault(src.name, set()).update(f.name for f in src.features)
        self.request_fields = sorted(
            {f.name for odfv, _ in self._odfvs
             for rs in odfv.source_request_sources.values() for f in rs.schema}
        )
        self._reads: list[_ViewRead] = []
        for name, feats in needed.items():
            view = store.get_feature_view(name)
            if len(view.join_keys) != 1:
                raise ValueError(f"feature view {name} must have exactly one join key")
            ttl = int(view.ttl.total_seconds() * 1_000_000) if view.ttl else None
            self._reads.append(_ViewRead(view, view.join_keys[0], sorted(feats), ttl))
        self.join_keys = sorted({r.join_key for r in self._reads})
        self._config = store.config
        self._online = get_online_store_from_config(store.config.online_store)
        self._redis: RedisFeatureReader | None = None
        if is_supported(store.config.online_store):
            self._redis = RedisFeatureReader(store.config, self._reads)
            self._reads = self._redis.reads  # fetch results come back in the reader's order

    def answered_since(self, t: float) -> bool:
        """Whether the online store answered a read of this process after `t`
        (`time.monotonic()`): after a missed lookup deadline, a store that answered others
        meanwhile is alive, and the deadline went to this process's own load."""
        return self._redis is not None and self._redis.answered_at > t

    async def ping_async(self) -> bool:
        """Whether the online store answers (bounded by its socket timeout)."""
        try:
            if self._redis is not None:
                return bool(await self._redis.aio.ping())  # type: ignore[misc]
            return bool(await asyncio.to_thread(self._online.online_read, self._config,
                                                self._reads[0].view, [], []))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    # --- reading -------------------------------------------------------------------------
    def _entity_keys(self, read: _ViewRead, rows: Sequence[Row]) -> list[EntityKey]:
        protos = python_values_to_proto_values(
            [r[read.join_key] for r in rows], ValueType.STRING
        )
        return [EntityKey(join_keys=[read.join_key], entity_values=[p]) for p in protos]

    def fetch(self, rows: Sequence[Row]) -> Fetched:
        """Stored rows per view (blocking), through Feast's `online_read` on every store (the
        stream scorer's path: a Bytewax worker may block)."""
        # Feast appends its `_ts:<view>` key to the list it is given: pass a copy, or the
        # list grows by one name per request.
        return [
            self._online.online_read(
                self._config, r.view, self._entity_keys(r, rows), list(r.features)
            )
            for r in self._reads
        ]

    async def fetch_async(self, rows: Sequence[Row]) -> Fetched:
        """Stored rows per view, all views read concurrently; TimeoutError past
        `lookup_timeout_s` (the deadline covers the lookup only, never assembly or model)."""
        async with asyncio.timeout(self.lookup_timeout_s):
            return await self._fetch_async(rows)

    async def _fetch_async(self, rows: Sequence[Row]) -> Fetched:
        if self._redis is not None:
            return await self._redis.fetch_async(rows)
        return list(
            await asyncio.gather(
                *(
                    self._online.online_read_async(  # a copy: see `fetch`
                        self._config, r.view, self._entity_keys(r, rows), list(r.features)
                    )
                    for r in self._reads
                )
            )
        )

    # --- assembling ----------------------------------------------------------------------
    def assemble(
        self, rows: Sequence[Row], fetched: Fetched
    ) -> list[FeatureVector]:
        """Apply the TTL rule and the on-demand transformations; one vector per row."""
        n = len(rows)
        inputs: dict[str, list[Any]] = {f: [r[f] for r in rows] for f in self.request_fields}
        request_us = [r["request_ts_us"] for r in rows]
        ages: list[dict[str, float | None]] = [{} for _ in range(n)]
        stale: list[list[str]] = [[] for _ in range(n)]
        for read, results in zip(self._reads, fetched, strict=True):
            features, ttl_us = read.features, read.ttl_us
            cols: list[list[Any]]
            if isinstance(results, tuple):  # RedisFeatureReader's columns (fresh lists)
                times, cols = results
                for i, row_us in enumerate(times):
                    if row_us is None:  # no row: its values are None already
                        continue
                    t = request_us[i]
                    if row_us > t or (ttl_us is not None and row_us < t - ttl_us):
                        stale[i].extend(features)
                        for col in cols:
                            col[i] = None
                        continue
                    ages[i].update(dict.fromkeys(features, (t - row_us) / 1e6))
            else:
                cols = [[None] * n for _ in features]
                for i, (ts, values) in enumerate(results):
                    if ts is None or not values or never_written(ts):
                        continue
                    t, row_us = request_us[i], _micros(ts)
                    if row_us > t or (ttl_us is not None and row_us < t - ttl_us):
                        stale[i].extend(features)
                        continue
                    for col, f in zip(cols, features, strict=True):
                        col[i] = to_python(values[f]) if f in values else None
                    ages[i].update(dict.fromkeys(features, (t - row_us) / 1e6))
            inputs.update(zip(features, cols, strict=True))
        for odfv, _ in self._odfvs:
            out = odfv.feature_transformation.udf(inputs)  # type: ignore[union-attr]
            inputs.update(out)
        output = self.output
        columns = [inputs[name] for name in output]
        matrix = _model_matrix(columns, n) if n >= _MATRIX_MIN_ROWS else None
        # only a row whose model inputs hold a NaN can miss a value
        holes = (range(n) if matrix is None
                 else set(np.flatnonzero(np.isnan(matrix).any(axis=1)).tolist()))
        vectors = []
        for i, row in enumerate(zip(*columns, strict=True)):
            # missing: None or NaN (the only float unequal to itself)
            missing = [k for k, v in zip(output, row, strict=True)
                       if v is None or (v != v and isinstance(v, float))] if i in holes else []
            vectors.append(FeatureVector(dict(zip(output, row, strict=True)), ages[i], missing,
                                         stale[i], *((None, None) if matrix is None
                                                     else (matrix[i], output))))
        return vectors


# Below this many rows assembly leaves the model's rows to `scoring.scorer.model_row` (the
# whole-batch conversion costs more than it saves).
_MATRIX_MIN_ROWS = 8


def _model_matrix(columns: list[list[Any]], n: int) -> np.ndarray | None:
    """The model's inputs of `n` rows from their columns, exactly as `scoring.scorer.model_row`
    makes them (`float(v)`, None as NaN), when every value is None or a plain number (numpy's
    conversion to float64 is then `float()`'s); None otherwise (the caller falls back to
    `model_row`, which converts or fails as it always did)."""
    for col in columns:
        if not _NUMBERS.issuperset(map(type, col)):
            return None
    try:
        matrix = np.array(columns, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # an int past float64's range
        return None
    return matrix.T if matrix.shape == (len(columns), n) else None


_NUMBERS = frozenset({float, int, bool, type(None), np.float64, np.int64})


class RedisFeatureReader:
    """One Redis round trip per request for all feature views (Feast's Redis hash layout).

    Feast keeps every feature view of an entity in one hash, so one HMGET per entity reads all
    the views of its join key (`feature_repo.redis_store.reader`), where `online_read` sends
    one pipeline per view.  Answers what Feast's `online_read` answers, by column
    (`redis_store.reader.HashReader.decode_columns`): per view, each entity's row time as
    the stored timestamp's exact epoch microseconds (None for a key never written) and per
    feature the values, already Python; `tests/integration/serving/test_api.py` and the skew
    test check the result against Feast's own reads.
    """

    def __init__(self, config: Any, reads: list[_ViewRead]) -> None:
        self.aio = async_redis_client(config.online_store)
        groups: dict[str, list[_ViewRead]] = {}
        for r in reads:
            groups.setdefault(r.join_key, []).append(r)
        self._readers = [
            HashReader(config, join_key,
                       [(view_name(r.view, config), r.features) for r in group])
            for join_key, group in groups.items()
        ]
        self._order = [r for group in groups.values() for r in group]
        self._coalescer = _Coalescer(self._read)
        self.answered_at = -math.inf  # time.monotonic() of the last read Redis answered

    async def _read(self, rows: Sequence[Row]) -> Replies:
        out = await read_replies_async(
            self.aio, [(h, [row[h.join_key] for row in rows]) for h in self._readers])
        self.answered_at = time.monotonic()
        return out

    @property
    def reads(self) -> list[_ViewRead]:
        """The views in the order `fetch_async` answers them."""
        return self._order

    async def fetch_async(self, rows: Sequence[Row]) -> Fetched:
        """This request's stored rows, read in the round trip of every request that asked
        in the same turn of the event loop (see `_Coalescer`)."""
        per_reader = await self._coalescer.read(rows)
        return [view for h, replies in zip(self._readers, per_reader, strict=True)
                for view in h.decode_columns(replies)]


class _Coalescer:
    """Concurrent lookups share one Redis round trip; every request still reads fresh rows.

    The requests that reach the lookup in the same turn of the event loop (a busy scorer
    parses several requests per turn) are read in one pipeline of at most `max_rows` rows,
    sent at the end of that turn, and each gets exactly its own rows back.  Nothing is kept between round trips: this saves
    the client's per-call work and system calls, never a read.  A request that gives up (its
    lookup deadline) leaves the shared read running for the others; an error fails every
    request of that round trip, as it would have failed each of them (a request decodes its
    own rows afterwards: a value that fails to decode fails only the request that asked for
    it).
    """

    def __init__(self, read: Callable[[Sequence[Row]], Awaitable[Replies]],
                 max_rows: int = 64) -> None:
        self._read = read
        self.max_rows = max_rows  # per shared round trip; a larger request reads alone
        self._queue: list[tuple[Sequence[Row], asyncio.Future[Replies]]] = []
        self._queued_rows = 0
        # the loop a flush is scheduled on (None: none is): a loop closed before its flush ran
        # (a caller's asyncio.run interrupted) must not leave later callers waiting
        self._scheduled: asyncio.AbstractEventLoop | None = None
        self._running: set[asyncio.Task[None]] = set()  # strong references until done

    async def read(self, rows: Sequence[Row]) -> Replies:
        # A large batch alone: sharing its round trip would make small requests wait for
        # Redis to answer all of its rows, and miss their lookup deadline for it.
        if len(rows) >= self.max_rows:
            return await self._read(rows)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Replies] = loop.create_future()
        if self._scheduled is not loop:  # what another loop left queued is not ours to send
            self._queue, self._queued_rows = [], 0
        elif self._queued_rows + len(rows) > self.max_rows:
            self._flush()
        self._queue.append((rows, future))
        self._queued_rows += len(rows)
        if self._scheduled is not loop:
            self._scheduled = loop
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._queue, self._queued_rows, self._scheduled = self._queue, [], 0, None
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._serve(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _serve(self, batch: list[tuple[Sequence[Row], asyncio.Future[Replies]]]) -> None:
        live = [(rows, f) for rows, f in batch if not f.done()]  # not given up already
        if not live:
            return
        try:
            per_reader = await self._read([row for rows, _ in live for row in rows])
        except Exception as exc:  # noqa: BLE001 - handed to every request of the batch
            for _, f in live:
                if not f.done():
                    f.set_exception(exc)
            return
        start = 0
        for rows, f in live:
            end = start + len(rows)
            if not f.done():
                f.set_result([entities[start:end] for entities in per_reader])
            start = end
