"""Online feature vectors through a model's feature service, with training's rules.

Built once at start-up from the registry: which feature views to read, with which entity keys
and TTLs, and which on-demand transformations (the registry's own UDFs, the functions training
ran through `get_historical_features`) turn them into model inputs.

Per request: one Redis pipeline per feature view (`online_read[_async]`, Feast's public online
store API), then the TTL rule of Feast's offline point-in-time join, which Feast does *not*
apply online: a stored row is used only if `t - ttl <= row_ts <= t` for the transaction's time
`t`; otherwise its features are missing, exactly as in the training frame.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from feast import FeatureStore, FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import get_online_store_from_config
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

from feature_repo.redis_wire import field_name, string_key_encoder, to_python

Row = dict[str, Any]


@dataclass
class FeatureVector:
    """Model inputs of one transaction plus what an explanation needs."""

    values: dict[str, Any]
    ages: dict[str, float | None] = field(default_factory=dict)  # stored features only
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _ViewRead:
    view: FeatureView
    join_key: str
    features: list[str]
    ttl_us: int | None


def _micros(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


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
        if hasattr(store.config.online_store, "client_kwargs"):
            self._redis = RedisFeatureReader(store.config, self._reads)
            self._reads = self._redis.reads  # fetch results come back in the reader's order

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

    def fetch(self, rows: Sequence[Row]) -> list[list[tuple[datetime | None, Any]]]:
        """Stored rows per view (blocking)."""
        # Feast appends its `_ts:<view>` key to the list it is given: pass a copy, or the
        # list grows by one name per request.
        return [
            self._online.online_read(
                self._config, r.view, self._entity_keys(r, rows), list(r.features)
            )
            for r in self._reads
        ]

    async def fetch_async(self, rows: Sequence[Row]) -> list[list[tuple[datetime | None, Any]]]:
        """Stored rows per view, all views read concurrently; TimeoutError past
        `lookup_timeout_s` (the deadline covers the lookup only, never assembly or model)."""
        async with asyncio.timeout(self.lookup_timeout_s):
            return await self._fetch_async(rows)

    async def _fetch_async(self, rows: Sequence[Row]) -> list[list[tuple[datetime | None, Any]]]:
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
        self, rows: Sequence[Row], fetched: list[list[tuple[datetime | None, Any]]]
    ) -> list[FeatureVector]:
        """Apply the TTL rule and the on-demand transformations; one vector per row."""
        n = len(rows)
        inputs: dict[str, list[Any]] = {f: [r[f] for r in rows] for f in self.request_fields}
        ages: list[dict[str, float | None]] = [{} for _ in range(n)]
        stale: list[list[str]] = [[] for _ in range(n)]
        for read, results in zip(self._reads, fetched, strict=True):
            cols: dict[str, list[Any]] = {f: [None] * n for f in read.features}
            for i, (ts, values) in enumerate(results):
                t = rows[i]["request_ts_us"]
                if ts is None or not values:
                    continue
                row_us = _micros(ts)
                if row_us > t or (read.ttl_us is not None and row_us < t - read.ttl_us):
                    if row_us > 0:  # Feast returns 1970 for keys it never saw
                        stale[i].extend(read.features)
                    continue
                for f in read.features:
                    cols[f][i] = to_python(values[f]) if f in values else None
                    ages[i][f] = (t - row_us) / 1e6
            inputs.update(cols)
        for odfv, _ in self._odfvs:
            out = odfv.feature_transformation.udf(inputs)  # type: ignore[union-attr]
            inputs.update(out)
        vectors = []
        for i in range(n):
            values = {name: inputs[name][i] for name in self.output}
            missing = [k for k, v in values.items() if _is_missing(v)]
            vectors.append(FeatureVector(values, ages[i], missing, stale[i]))
        return vectors


class RedisFeatureReader:
    """One Redis round trip per request for all feature views (Feast's Redis hash layout).

    Feast keeps every feature view of an entity in one hash keyed by the serialized entity key
    plus the project; fields are murmur3 hashes of "view:feature" and `_ts:view`.  Reading
    them with one pipelined HMGET per entity (instead of one pipeline per view, as
    `online_read` does) returns byte-identical ValueProtos; `tests/test_api.py` and the skew
    test check the result against Feast's own reads.
    """

    def __init__(self, config: Any, reads: list[_ViewRead]) -> None:
        import redis
        import redis.asyncio
        from redis.asyncio.retry import Retry as AsyncRetry
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._project = config.project.encode()
        self._version = config.entity_key_serialization_version
        kwargs = config.online_store.client_kwargs()
        # Fail fast: one immediate retry (a pooled connection may be stale after a Redis
        # restart), no backoff; redis-py's default would retry 3 times with growing sleeps.
        self.sync = redis.Redis(**kwargs, retry=Retry(NoBackoff(), 1))
        self.aio = redis.asyncio.Redis(**kwargs, retry=AsyncRetry(NoBackoff(), 1))
        # per join key: [(read, [field bytes..., ts field])]
        self._groups: dict[str, list[tuple[_ViewRead, list[bytes | str]]]] = {}
        for r in reads:
            fields: list[bytes | str] = [field_name(r.view.name, f) for f in r.features]
            fields.append(f"_ts:{r.view.name}")
            self._groups.setdefault(r.join_key, []).append((r, fields))
        self._order = [r for group in self._groups.values() for r, _ in group]
        self._encoders = {jk: enc for jk in self._groups
                          if (enc := string_key_encoder(jk, self._version, self._project))}
        self._fields = {k: [f for _, fs in g for f in fs] for k, g in self._groups.items()}

    def _keys(self, join_key: str, rows: Sequence[Row]) -> list[bytes]:
        encode = self._encoders.get(join_key)
        if encode is not None:
            return [encode(r[join_key]) for r in rows]
        protos = python_values_to_proto_values([r[join_key] for r in rows], ValueType.STRING)
        return [
            serialize_entity_key(EntityKey(join_keys=[join_key], entity_values=[p]),
                                 entity_key_serialization_version=self._version) + self._project
            for p in protos
        ]

    def _commands(self, rows: Sequence[Row]) -> list[tuple[bytes, list[bytes | str]]]:
        return [(key, self._fields[jk]) for jk in self._groups for key in self._keys(jk, rows)]

    def _decode(self, rows: Sequence[Row], replies: list[list[bytes | None]]
                ) -> list[list[tuple[datetime | None, Any]]]:
        n = len(rows)
        out: dict[str, list[tuple[datetime | None, Any]]] = {}
        for gi, group in enumerate(self._groups.values()):
            per_view: dict[str, list[tuple[datetime | None, Any]]] = {
                r.view.name: [] for r, _ in group}
            for i in range(n):
                reply = replies[gi * n + i]
                pos = 0
                for r, fields in group:
                    chunk = reply[pos: pos + len(fields)]
                    pos += len(fields)
                    ts_raw = chunk[-1]
                    if not ts_raw:
                        per_view[r.view.name].append((None, None))
                        continue
                    ts = Timestamp.FromString(ts_raw)
                    when = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)
                    vals = {f: Value.FromString(b) if b else Value()
                            for f, b in zip(r.features, chunk[:-1], strict=True)}
                    per_view[r.view.name].append((when, vals))
            out.update(per_view)
        return [out[r.view.name] for r in self._order]

    @property
    def reads(self) -> list[_ViewRead]:
        return self._order

    def fetch(self, rows: Sequence[Row]) -> list[list[tuple[datetime | None, Any]]]:
        with self.sync.pipeline(transaction=False) as pipe:
            for key, fields in self._commands(rows):
                pipe.hmget(key, fields)  # type: ignore[arg-type]  # bytes keys are fine
            return self._decode(rows, pipe.execute())

    async def fetch_async(self, rows: Sequence[Row]) -> list[list[tuple[datetime | None, Any]]]:
        async with self.aio.pipeline(transaction=False) as pipe:
            for key, fields in self._commands(rows):
                pipe.hmget(key, fields)  # type: ignore[arg-type]  # bytes keys are fine
            return self._decode(rows, await pipe.execute())
