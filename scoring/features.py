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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
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


class FeatureVector:
    """Model inputs of one transaction plus what an explanation needs.

    `values`: the feature service's outputs by name; `ages`: seconds from each stored row to
    the request, by feature (stored features only); `missing`: the outputs that are None or
    NaN; `stale`: the stored features the TTL rule discarded.  `inputs`: `values` as the
    model's float64 row (None as NaN), in the order of `input_names` (the feature service's
    output), when `OnlineFeatures.assemble` converted them (batches of `_MATRIX_MIN_ROWS` or
    more, plain numbers); otherwise None, and the model's row is `scoring.scorer.model_row`'s.

    A vector of an assembled batch builds its `values` and `ages` dicts from the batch's
    columns when first asked (`_Batch`): scoring needs neither (the model reads `inputs`,
    the drift monitor the columns through `value_rows`), only explanations and the
    prediction log's records do.  Equality compares `values`, `ages`, `missing` and `stale`.
    """

    __slots__ = ("_values", "_ages", "missing", "stale", "inputs", "input_names", "_batch",
                 "_row")

    def __init__(self, values: dict[str, Any], ages: dict[str, float | None] | None = None,
                 missing: list[str] | None = None, stale: list[str] | None = None,
                 inputs: np.ndarray | None = None, input_names: list[str] | None = None
                 ) -> None:
        self._values: dict[str, Any] | None = values
        self._ages: dict[str, float | None] | None = {} if ages is None else ages
        self.missing: list[str] = [] if missing is None else missing
        self.stale: list[str] = [] if stale is None else stale
        self.inputs = inputs
        self.input_names = input_names
        self._batch: _Batch | None = None
        self._row = 0

    @classmethod
    def _of(cls, batch: _Batch, row: int, missing: list[str], stale: list[str],
            inputs: np.ndarray | None, input_names: list[str] | None) -> FeatureVector:
        vec = cls.__new__(cls)
        vec._values = vec._ages = None
        vec.missing, vec.stale, vec.inputs, vec.input_names = missing, stale, inputs, input_names
        vec._batch, vec._row = batch, row
        return vec

    @property
    def values(self) -> dict[str, Any]:
        if self._values is None:
            self._values = self._batch.values(self._row)  # type: ignore[union-attr]
        return self._values

    @values.setter
    def values(self, values: dict[str, Any]) -> None:
        self._values = values

    @property
    def ages(self) -> dict[str, float | None]:
        if self._ages is None:
            self._ages = self._batch.ages(self._row)  # type: ignore[union-attr]
        return self._ages

    @ages.setter
    def ages(self, ages: dict[str, float | None]) -> None:
        self._ages = ages

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled with its own dicts, not its batch's columns
        return (FeatureVector, (self.values, self.ages, self.missing, self.stale, self.inputs,
                                self.input_names))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureVector):
            return NotImplemented
        return ((self.values, self.ages, self.missing, self.stale)
                == (other.values, other.ages, other.missing, other.stale))

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return (f"FeatureVector(values={self.values!r}, ages={self.ages!r}, "
                f"missing={self.missing!r}, stale={self.stale!r})")


class _Batch:
    """What the vectors of one assembled batch share: the feature service's output columns
    and, per stored view, its features and each row's age (None: no row, or a stale one)."""

    __slots__ = ("output", "columns", "view_ages", "n", "matrix")

    def __init__(self, output: list[str], columns: list[list[Any]],
                 view_ages: list[tuple[list[str], list[float | None]]], n: int) -> None:
        self.output, self.columns, self.view_ages, self.n = output, columns, view_ages, n
        self.matrix: np.ndarray | None = None  # the vectors' `inputs`, stacked

    def values(self, i: int) -> dict[str, Any]:
        return dict(zip(self.output, [col[i] for col in self.columns], strict=True))

    def ages(self, i: int) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for features, ages in self.view_ages:
            if (age := ages[i]) is not None:
                out.update(dict.fromkeys(features, age))
        return out


def _whole_batch(vectors: Sequence[FeatureVector]) -> _Batch | None:
    """The batch `vectors` are, if they are all of one assembled batch, in its order."""
    batch = vectors[0]._batch if vectors else None
    if (batch is not None and batch.n == len(vectors)
            and all(v._batch is batch and v._row == i for i, v in enumerate(vectors))):
        return batch
    return None


def stacked_inputs(vectors: Sequence[FeatureVector], names: list[str]) -> np.ndarray | None:
    """The vectors' `inputs` stacked (the model's matrix), if every vector has them in the
    order of `names` (the very list: the feature service's output); else None.  For a whole
    batch it is the batch's own matrix, of which the vectors' `inputs` are rows, shared by
    every model that scores the batch (a shadow too): a model must not write to it."""
    batch = _whole_batch(vectors)
    if batch is not None and batch.matrix is not None and batch.output is names:
        return batch.matrix  # the rows `inputs` are views of
    if vectors and all(v.input_names is names and v.inputs is not None for v in vectors):
        return np.stack([v.inputs for v in vectors])  # type: ignore[misc]
    return None


def value_rows(vectors: Sequence[FeatureVector], names: Sequence[str]
               ) -> Iterable[tuple[Any, ...]]:
    """Each vector's values of `names`, in that order, as a tuple (None for a name it lacks):
    for the vectors of one assembled batch, all of them in order, straight from its columns
    (no dict per vector)."""
    batch = _whole_batch(vectors)
    if batch is not None and names:
        where = {name: j for j, name in enumerate(batch.output)}
        if all(name in where for name in names):
            return zip(*[batch.columns[where[name]] for name in names], strict=True)
    return (tuple([v.values.get(name) for name in names]) for v in vectors)


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
        view_ages: list[tuple[list[str], list[float | None]]] = []
        stale: list[list[str]] = [[] for _ in range(n)]
        for read, results in zip(self._reads, fetched, strict=True):
            features, ttl_us = read.features, read.ttl_us
            ages: list[float | None] = [None] * n
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
                    ages[i] = (t - row_us) / 1e6
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
                    ages[i] = (t - row_us) / 1e6
            view_ages.append((features, ages))
            inputs.update(zip(features, cols, strict=True))
        for odfv, _ in self._odfvs:
            out = odfv.feature_transformation.udf(inputs)  # type: ignore[union-attr]
            inputs.update(out)
        output = self.output
        columns = [inputs[name] for name in output]
        batch = _Batch(output, columns, view_ages, n)
        matrix = batch.matrix = _model_matrix(columns, n) if n >= _MATRIX_MIN_ROWS else None
        # only a row whose model inputs hold a NaN can miss a value
        holes = (range(n) if matrix is None
                 else np.flatnonzero(np.isnan(matrix).any(axis=1)).tolist())
        missing: list[list[str]] = [[] for _ in range(n)]
        for i in holes:
            # missing: None or NaN (the only float unequal to itself)
            missing[i] = [k for k, col in zip(output, columns, strict=True)
                          if (v := col[i]) is None or (v != v and isinstance(v, float))]
        if matrix is None:
            return [FeatureVector._of(batch, i, missing[i], stale[i], None, None)
                    for i in range(n)]
        return [FeatureVector._of(batch, i, missing[i], stale[i], matrix[i], output)
                for i in range(n)]


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
    # row-major, as the model reads it (one row per transaction, contiguous)
    return np.ascontiguousarray(matrix.T) if matrix.shape == (len(columns), n) else None


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
        """Each row's HMGET reply per reader, every distinct key read once: the rows of a
        batch (or of the requests sharing a round trip) repeat merchants, and cards, and
        replies are that one read's (the same reply for each of its rows, decoded per row)."""
        keys = [[row[h.join_key] for row in rows] for h in self._readers]
        distinct = [list(dict.fromkeys(values)) for values in keys]
        out = await read_replies_async(self.aio, list(zip(self._readers, distinct, strict=True)))
        self.answered_at = time.monotonic()
        for k, (values, unique) in enumerate(zip(keys, distinct, strict=True)):
            if len(unique) < len(values):
                at = {value: i for i, value in enumerate(unique)}
                replies = out[k]
                out[k] = [replies[at[value]] for value in values]
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
