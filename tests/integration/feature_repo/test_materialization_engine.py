"""The bulk materialization engine (feature_repo.materialization) against Feast's stock engine.

* Encoding: `redis_store.encode` produces, byte for byte, the keys, timestamps and values Feast's own
  conversion (`python_values_to_proto_values`, `serialize_entity_key`, protobuf Timestamp)
  produces, for every fast-path type and the fallback, with nulls, NaNs and empty lists.
* Equivalence: a synthetic repo (two views: string key with a created-timestamp tie-break, int
  key over a directory of files; int/float/bool/string/bytes/timestamp values and lists, nulls,
  NaNs, rows outside the window) is materialized by the stock local engine and by
  ours into two Redis databases; every Redis hash and every `get_online_features` answer
  (values and event timestamps) must be identical, for the full range and for a sub-window.
* Ordering: a row never replaces a stored row that is newer or equally new; it does replace an
  older one; `materialize_incremental` continues from the recorded interval.
* Rows with a null key (the stock engine fails on them) are skipped.
* The real repo: the session's feature data materialized by both engines, all hashes equal.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig, ValueType
from feast.data_format import ParquetFormat
from feast.infra.common.materialization_job import MaterializationTask
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import python_values_to_proto_values
from feast.types import (
    Array,
    Bool,
    Bytes,
    Float32,
    Float64,
    Int32,
    Int64,
    String,
    UnixTimestamp,
)
from google.protobuf.timestamp_pb2 import Timestamp

from feature_repo.config import redis_connection_string
from feature_repo.materialization import ENGINE_TYPE, FastRedisMaterializationEngine
from feature_repo.online_store import FraudRedisOnlineStore
from feature_repo.redis_store.encode import RowEncoder
from tests.conftest import PROJECT, SIM_END

OURS_DB, STOCK_DB = 10, 14  # this module's Redis databases (the benchmarks use 11-13)
START = datetime(2000, 1, 1, tzinfo=UTC)
BASE = datetime(2026, 3, 1, tzinfo=UTC)
END = BASE + timedelta(days=10)
N_WIDE, N_NARROW = 3000, 1500


# --- encoding (no Redis) -------------------------------------------------------------------

def _bulks(blob: bytes) -> list[bytes]:
    """Split a run of Redis bulk strings."""
    out, i = [], 0
    while i < len(blob):
        assert blob[i:i + 1] == b"$"
        j = blob.index(b"\r\n", i)
        n = int(blob[i + 1:j])
        out.append(blob[j + 2:j + 2 + n])
        assert blob[j + 2 + n:j + 4 + n] == b"\r\n"
        i = j + 4 + n
    return out


ENCODING_CASES: list[tuple[pa.Array, ValueType]] = [
    (pa.array([0, 1, -1, 127, 128, 2**31, -2**63, 2**63 - 1, 300], pa.int64()), ValueType.INT64),
    (pa.array([0, None, -5, 2**40, 1, 2, 3, 4, None], pa.int64()), ValueType.INT64),
    (pa.array([None] * 9, pa.int64()), ValueType.INT64),
    (pa.array([0, 1, None, -5, 2**31 - 1, -2**31, 1, 1, 1], pa.int32()), ValueType.INT32),
    (pa.array([0.0, -0.0, 1.5, float("nan"), None, float("inf"), -1e300, 2.0, 5e-324]),
     ValueType.DOUBLE),
    (pa.array([0.0, 1.5, None, float("nan"), 1, 2, 3, 4, -7], pa.float32()), ValueType.FLOAT),
    (pa.array([True, False, None, True, True, True, False, False, False]), ValueType.BOOL),
    (pa.array(["", "a", None, "é" * 200, "x", "y" * 127, "z" * 128, "w" * 20000, "🙂"]),
     ValueType.STRING),
    (pa.array(["a", None, "b"] * 3, pa.large_string()), ValueType.STRING),
    (pa.array([[1, -1, 2**40], [], None, [0], [1] * 200, [], [], [5], [-2**63]],
              pa.list_(pa.int64())), ValueType.INT64_LIST),
    (pa.array([[1, -1], [], None, [0], [1], [2], [3], [], []], pa.list_(pa.int32())),
     ValueType.INT32_LIST),
    (pa.array([[1.5, float("nan")], [], None, [0.0], [1.0] * 40, [], [], [], [-0.0]],
              pa.list_(pa.float64())), ValueType.DOUBLE_LIST),
    (pa.array([[1.5], [], None, [0.0], [], [], [], [], [1]], pa.list_(pa.float32())),
     ValueType.FLOAT_LIST),
    (pa.array([["a", ""], [], None, ["é" * 100], ["x"] * 100, [], [""], ["q"], ["r", "s"]],
              pa.list_(pa.string())), ValueType.STRING_LIST),
    # sliced list arrays, and the fallback: lists with null items, bool lists, bytes, mismatches
    (pa.array([[1, 2, 3], [4], [5, 6]] * 4, pa.list_(pa.int64())).slice(1, 9),
     ValueType.INT64_LIST),
    (pa.array([["a", None], [], None, [], [], [], [], [], []], pa.list_(pa.string())),
     ValueType.STRING_LIST),
    (pa.array([[True, False], [], None, [], [], [], [], [], []], pa.list_(pa.bool_())),
     ValueType.BOOL_LIST),
    (pa.array([b"", b"\x00\xff", None, b"x", b"y", b"z", b"", b"1", b"2"]), ValueType.BYTES),
    (pa.array([1, 2, 3, 4, 5, 6, 7, 8, 9], pa.int64()), ValueType.DOUBLE),
    (pa.array([0, None, 2**60, 1, 1, 1, 1, 1, 1], pa.int64()), ValueType.INT64),
]


def test_encoding_matches_feast_conversion_byte_for_byte() -> None:
    micros = np.array([0, 1, 999_999, 1_000_000, 1_767_225_600_123_456, -1, -1_500_000,
                       10**15, 5])
    batch = pa.table({f"c{i}": arr for i, (arr, _) in enumerate(ENCODING_CASES)}
                     | {"k": pa.array([f"u{i}é" for i in range(9)])})
    encoder = RowEncoder(
        project="proj", view_name="v", join_keys=[("k", ValueType.STRING.value)],
        features=[(f"c{i}", t.value) for i, (_, t) in enumerate(ENCODING_CASES)],
        key_serialization_version=3,
    )
    encoded = encoder.encode(batch, micros)
    rows = [_bulks(blob) for blob in encoded.values.to_pylist()]
    stamps = []
    for us in micros:
        ts = Timestamp()
        ts.FromDatetime(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us)))
        stamps.append(ts.SerializeToString())
    assert [r[0] for r in rows] == stamps
    for i, (arr, value_type) in enumerate(ENCODING_CASES):
        want = [p.SerializeToString() for p in python_values_to_proto_values(
            arr.to_numpy(zero_copy_only=False), value_type)]
        assert [r[1 + i] for r in rows] == want, (i, value_type)
    keys = [_bulks(blob) for blob in encoded.keys.to_pylist()]
    assert keys == [[serialize_entity_key(
        EntityKey(join_keys=["k"], entity_values=[Value(string_val=f"u{i}é")]),
        entity_key_serialization_version=3) + b"proj"] for i in range(9)]


@pytest.mark.parametrize("columns, join_keys", [
    ([pa.array([1, -2, 2**40])], [("id", ValueType.INT64.value)]),
    ([pa.array([1, -2, 7], pa.int32())], [("id", ValueType.INT32.value)]),
    ([pa.array(["b1", "b2", "b3"]), pa.array([1, 2, 3])],
     [("z_key", ValueType.STRING.value), ("a_key", ValueType.INT64.value)]),
    ([pa.array([b"x", b"y", b"z"])], [("b", ValueType.BYTES.value)]),  # one by one
])
def test_keys_match_serialize_entity_key(columns: list[pa.Array],
                                         join_keys: list[tuple[str, int]]) -> None:
    encoder = RowEncoder(project="p", view_name="v", join_keys=join_keys,
                                    features=[("f", ValueType.INT64.value)],
                                    key_serialization_version=3)
    batch = pa.table({k: c for (k, _), c in zip(join_keys, columns, strict=True)}
                     | {"f": pa.array([1, 2, 3])})
    got = [_bulks(b)[0] for b in encoder.encode(batch, np.zeros(3)).keys.to_pylist()]
    protos = [python_values_to_proto_values(c.to_numpy(zero_copy_only=False), ValueType(t))
              for c, (_, t) in zip(columns, join_keys, strict=True)]
    want = [serialize_entity_key(EntityKey(join_keys=[k for k, _ in join_keys],
                                           entity_values=list(values)),
                                 entity_key_serialization_version=3) + b"p"
            for values in zip(*protos, strict=True)]
    assert got == want


# --- a synthetic repo, materialized by both engines -------------------------------------------

def _wide_table(rng: np.random.Generator) -> pa.Table:
    """3 rows per key, shuffled; ties on event time broken by created time; nulls everywhere."""
    n = N_WIDE * 3
    key = np.repeat(np.arange(N_WIDE), 3)
    j = np.tile(np.arange(3), N_WIDE)
    us = int(BASE.timestamp() * 1e6)
    ts = us + rng.integers(0, 10 * 86_400, n) * 1_000_000 + rng.integers(0, 10**6, n)
    tie = np.repeat(rng.random(N_WIDE) < 0.2, 3) & (j == 2)
    ts[tie] = ts[np.flatnonzero(tie) - 1]
    created = ts + rng.integers(1, 10**6, n) * 3 + j
    created_null = tie & (rng.random(n) < 0.3)  # a null created time loses the tie
    late = np.repeat(rng.random(N_WIDE) < 0.05, 3)  # some keys only after the window
    ts[late] = int(END.timestamp() * 1e6) + rng.integers(1, 10**9, late.sum())

    def null(p: float) -> np.ndarray:
        return rng.random(n) < p

    lengths = rng.integers(0, 5, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(offsets[-1])
    f64 = rng.normal(0, 1e3, n)
    f64[null(0.05)] = np.nan
    table = pa.table({
        "key": pa.array([f"k{i:05d}-é" for i in key]),
        "event_timestamp": pa.array(ts, pa.timestamp("us", "UTC")),
        "created": pa.array(created, pa.timestamp("us", "UTC"), mask=created_null),
        "i64": pa.array(rng.integers(-2**40, 2**40, n), mask=null(0.05)),
        "i32": pa.array(rng.integers(-2**31, 2**31, n, dtype=np.int32)),
        "f64": pa.array(f64, mask=null(0.05)),
        "f32": pa.array(rng.normal(0, 1, n).astype(np.float32)),
        "flag": pa.array(rng.random(n) < 0.5, mask=null(0.1)),
        "name": pa.array(rng.choice(["", "ä", "long " * 30, "x"], n), mask=null(0.1)),
        "blob": pa.array([bytes([b]) * int(b % 4) for b in rng.integers(0, 256, n)]),
        "seen": pa.array(ts - 10**9, pa.timestamp("us", "UTC")),
        "ints": pa.ListArray.from_arrays(offsets, pa.array(rng.integers(-10**12, 10**12, total)),
                                         mask=pa.array(null(0.05))),
        "floats": pa.ListArray.from_arrays(offsets, pa.array(rng.normal(0, 1, total))),
        "tags": pa.ListArray.from_arrays(
            offsets, pa.array(rng.choice(["a", "", "tag-é"], total)), mask=pa.array(null(0.05))),
    })
    return table.take(pa.array(rng.permutation(n)))


def _narrow_tables(rng: np.random.Generator) -> list[pa.Table]:
    """Int keys, no created column (unique event times), split over three files."""
    n = N_NARROW * 4
    key = np.repeat(np.arange(N_NARROW) * 7 - 3000, 4)
    ts = int(BASE.timestamp() * 1e6) + rng.permutation(n).astype(np.int64) * 60_000_000
    table = pa.table({
        "num_id": pa.array(key),
        "ts": pa.array(ts, pa.timestamp("us", "UTC")),
        "score": pa.array(rng.normal(0, 1, n), mask=rng.random(n) < 0.05),
        "label": pa.array(rng.choice(["a", "b", "ccc"], n)),
    }).take(pa.array(rng.permutation(n)))
    return [table.slice(i, n // 3 + 1) for i in range(0, n, n // 3 + 1)]


def _views(data: Path) -> tuple[list[Any], FeatureView, FeatureView]:
    key = Entity(name="key", join_keys=["key"], value_type=ValueType.STRING)
    num = Entity(name="num", join_keys=["num_id"], value_type=ValueType.INT64)
    wide = FeatureView(
        name="wide_fv", entities=[key], ttl=timedelta(days=365), online=True,
        schema=[Field(name="i64", dtype=Int64), Field(name="i32", dtype=Int32),
                Field(name="f64", dtype=Float64), Field(name="f32", dtype=Float32),
                Field(name="flag", dtype=Bool), Field(name="name", dtype=String),
                Field(name="blob", dtype=Bytes), Field(name="seen", dtype=UnixTimestamp),
                Field(name="ints", dtype=Array(Int64)), Field(name="floats", dtype=Array(Float64)),
                Field(name="tags", dtype=Array(String))],
        source=FileSource(name="wide_source", path=str(data / "wide.parquet"),
                          file_format=ParquetFormat(), timestamp_field="event_timestamp",
                          created_timestamp_column="created"),
    )
    narrow = FeatureView(
        name="narrow_fv", entities=[num], ttl=timedelta(days=365), online=True,
        schema=[Field(name="score", dtype=Float64), Field(name="label", dtype=String)],
        source=FileSource(name="narrow_source", path=str(data / "narrow"),
                          file_format=ParquetFormat(), timestamp_field="ts"),
    )
    return [key, num, wide, narrow], wide, narrow


def _base_url() -> str:
    return os.environ["REDIS_URL"].rsplit("/", 1)[0]


def _open(root: Path, name: str, engine: str, db: int, **online: Any) -> FeatureStore:
    repo = root / name
    repo.mkdir(exist_ok=True)
    return FeatureStore(config=RepoConfig(
        project="engine_test",
        provider="local",
        registry={"registry_type": "sql", "path": f"sqlite:///{repo / 'registry.db'}"},
        online_store={"type": "feature_repo.online_store.FraudRedisOnlineStore",
                      "connection_string": redis_connection_string(f"{_base_url()}/{db}"),
                      **online},
        offline_store={"type": "feature_repo.offline_store.AsofDuckDBOfflineStore"},
        batch_engine={"type": engine},
        entity_key_serialization_version=3,
        repo_path=str(repo),
    ))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("engine")
    rng = np.random.default_rng(20)
    data = root / "data"
    (data / "narrow").mkdir(parents=True)
    wide_table = _wide_table(rng)
    pq.write_table(wide_table, data / "wide.parquet", row_group_size=2500)
    for i, part in enumerate(_narrow_tables(rng)):
        pq.write_table(part, data / "narrow" / f"part-{i}.parquet")
    objects, wide, narrow = _views(data)
    stores = {"ours": _open(root, "ours", ENGINE_TYPE, OURS_DB),
              "stock": _open(root, "stock", "local", STOCK_DB)}
    for store in stores.values():
        store.apply(objects)
    clients = {"ours": redis.Redis.from_url(f"{_base_url()}/{OURS_DB}"),
               "stock": redis.Redis.from_url(f"{_base_url()}/{STOCK_DB}")}
    yield {"stores": stores, "redis": clients, "wide": wide, "narrow": narrow,
           "wide_table": wide_table, "root": root, "objects": objects}
    for client in clients.values():
        client.flushdb()
    shutil.rmtree(root, ignore_errors=True)


def _hashes(client: Any) -> dict[bytes, dict[bytes, bytes]]:
    """Every hash of the database (a synchronous `redis.Redis`)."""
    return {k: client.hgetall(k) for k in client.scan_iter(count=1000)}


def _online(store: FeatureStore, view: FeatureView, key: str, ids: list[Any]) -> bytes:
    resp = store.get_online_features(features=[f"{view.name}:{f.name}" for f in view.features],
                                     entity_rows=[{key: i} for i in ids])
    return pickle.dumps(resp.to_dict(include_event_timestamps=True))  # NaN-safe comparison


def _both(synthetic: dict[str, Any], start: datetime, end: datetime) -> None:
    for name, store in synthetic["stores"].items():
        synthetic["redis"][name].flushdb()
        store.materialize(start_date=start, end_date=end)


@pytest.mark.integration
@pytest.mark.slow
def test_same_redis_contents_and_online_features_as_stock(synthetic: dict[str, Any]) -> None:
    _both(synthetic, START, END)
    ours, stock = (_hashes(synthetic["redis"][n]) for n in ("ours", "stock"))
    assert len(ours) > 0.9 * (N_WIDE + N_NARROW)
    assert ours == stock
    wide_ids: list[Any] = [f"k{i:05d}-é" for i in range(N_WIDE)] + ["missing"]
    narrow_ids: list[Any] = [i * 7 - 3000 for i in range(N_NARROW)] + [10**9]
    cases: list[tuple[FeatureView, str, list[Any]]] = [
        (synthetic["wide"], "key", wide_ids), (synthetic["narrow"], "num_id", narrow_ids)]
    for view, key, ids in cases:
        assert _online(synthetic["stores"]["ours"], view, key, ids) == \
            _online(synthetic["stores"]["stock"], view, key, ids)


@pytest.mark.integration
@pytest.mark.slow
def test_same_as_stock_for_a_window_with_inclusive_ends(synthetic: dict[str, Any]) -> None:
    times = pc_sorted_times(synthetic["wide_table"])
    start, end = times[len(times) // 4], times[len(times) // 2]  # both are some row's time
    _both(synthetic, start, end)
    ours, stock = (_hashes(synthetic["redis"][n]) for n in ("ours", "stock"))
    assert 0 < len(ours) < N_WIDE + N_NARROW
    assert ours == stock


def pc_sorted_times(table: pa.Table) -> list[datetime]:
    return sorted(set(table.column("event_timestamp").to_pylist()))


def _latest(table: pa.Table) -> pd.DataFrame:
    """Each key's latest row in [START, END] by (event, created; null created first)."""
    df = table.to_pandas()
    df = df[df["event_timestamp"] <= pd.Timestamp(END)]
    df = df.sort_values(["event_timestamp", "created"], na_position="first")
    return df.groupby("key").tail(1).set_index("key", drop=False)


@pytest.mark.integration
def test_never_replaces_a_newer_or_equally_new_stored_row(synthetic: dict[str, Any]) -> None:
    store, client = synthetic["stores"]["ours"], synthetic["redis"]["ours"]
    latest = _latest(synthetic["wide_table"])
    newer_key, equal_key, older_key = latest.index[:3]
    client.flushdb()

    def push(key: str, at: datetime, i64: int) -> None:
        row = latest.loc[key].to_dict() | {"event_timestamp": at, "created": at, "i64": i64}
        store.write_to_online_store("wide_fv", pd.DataFrame([row]))

    times = {k: latest.loc[k, "event_timestamp"].to_pydatetime()
             for k in (newer_key, equal_key, older_key)}
    push(newer_key, END + timedelta(days=1), -1)  # a stream wrote a newer row
    push(equal_key, times[equal_key], -2)  # same instant, different value
    push(older_key, times[older_key] - timedelta(microseconds=1), -3)
    store.materialize(start_date=START, end_date=END)

    got = store.get_online_features(features=["wide_fv:i64"], entity_rows=[
        {"key": k} for k in (newer_key, equal_key, older_key)]).to_dict()["i64"]
    want_older = latest.loc[older_key, "i64"]
    assert got[:2] == [-1, -2]
    assert got[2] == (None if pd.isna(want_older) else int(want_older)) != -3
    assert client.dbsize() > 0.9 * (N_WIDE + N_NARROW)


@pytest.mark.integration
def test_materialize_incremental_continues_from_the_recorded_interval(
    synthetic: dict[str, Any],
) -> None:
    ours = _open(synthetic["root"], "incremental", ENGINE_TYPE, OURS_DB)  # no intervals yet
    ours.apply(synthetic["objects"])
    stock = synthetic["stores"]["stock"]
    for name in ("ours", "stock"):
        synthetic["redis"][name].flushdb()
    middle = BASE + timedelta(days=5)
    ours.materialize(start_date=START, end_date=middle)
    first = synthetic["redis"]["ours"].dbsize()
    ours.materialize_incremental(end_date=END)
    stock.materialize(start_date=START, end_date=END)
    assert 0 < first < synthetic["redis"]["ours"].dbsize()
    assert _hashes(synthetic["redis"]["ours"]) == _hashes(synthetic["redis"]["stock"])


def test_unsupported_views_go_to_the_stock_engine(tmp_path: Path) -> None:
    config = _open(tmp_path, "plan", ENGINE_TYPE, OURS_DB).config
    engine = FastRedisMaterializationEngine(repo_config=config, offline_store=None,
                                            online_store=FraudRedisOnlineStore(), type=ENGINE_TYPE)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": ["a"], "event_timestamp": [BASE], "v": [1]}), path)
    key = Entity(name="key", join_keys=["key"], value_type=ValueType.STRING)

    def task(**source: Any) -> MaterializationTask:
        view = FeatureView(name="v_fv", entities=[key], ttl=timedelta(days=1),
                           schema=[Field(name="v", dtype=Int64), Field(name="key", dtype=String)],
                           source=FileSource(path=str(path), timestamp_field="event_timestamp",
                                             **source))
        return MaterializationTask(project="p", feature_view=view, start_time=START, end_time=END)

    assert engine.plan(task()) is not None
    assert engine.plan(task(field_mapping={"v_raw": "v"})) is None
    missing = FileSource(path=str(tmp_path / "nope.parquet"), timestamp_field="event_timestamp")
    assert engine.plan(MaterializationTask(
        project="p", feature_view=FeatureView(
            name="w_fv", entities=[key], source=missing,
            schema=[Field(name="v", dtype=Int64), Field(name="key", dtype=String)]),
        start_time=START, end_time=END)) is None


@pytest.mark.integration
def test_wide_view_with_key_ttl_matches_stock(tmp_path: Path) -> None:
    """170 features (several HSETs per key in the script) and `key_ttl_seconds` (EXPIRE)."""
    rng = np.random.default_rng(5)
    n, width = 400, 170
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({
        "key": pa.array([f"w{i % (n // 2)}" for i in range(n)]),
        "event_timestamp": pa.array(int(BASE.timestamp() * 1e6) + np.arange(n) * 1_000_000,
                                    pa.timestamp("us", "UTC")),
        **{f"f{j}": pa.array(rng.integers(-1000, 1000, n)) for j in range(width)},
    }), path)
    key = Entity(name="key", join_keys=["key"], value_type=ValueType.STRING)
    view = FeatureView(name="many_fv", entities=[key], ttl=timedelta(days=1),
                       schema=[Field(name=f"f{j}", dtype=Int64) for j in range(width)],
                       source=FileSource(path=str(path), timestamp_field="event_timestamp"))
    hashes = []
    for name, engine, db in [("ours", ENGINE_TYPE, OURS_DB), ("stock", "local", STOCK_DB)]:
        store = _open(tmp_path, name, engine, db, key_ttl_seconds=3600)
        store.apply([key, view])
        client: Any = redis.Redis.from_url(f"{_base_url()}/{db}")
        client.flushdb()
        store.materialize(start_date=START, end_date=END)
        hashes.append(_hashes(client))
        assert all(0 < client.ttl(k) <= 3600 for k in hashes[-1])
        client.flushdb()
    assert len(hashes[0]) == n // 2
    assert hashes[0] == hashes[1]


@pytest.mark.integration
def test_rows_with_a_null_key_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": ["a", None, "b"], "event_timestamp": [BASE] * 3,
                             "v": [1, 2, 3]}), path)
    key = Entity(name="key", join_keys=["key"], value_type=ValueType.STRING)
    view = FeatureView(name="v_fv", entities=[key], ttl=timedelta(days=1),
                       schema=[Field(name="v", dtype=Int64), Field(name="key", dtype=String)],
                       source=FileSource(path=str(path), timestamp_field="event_timestamp"))
    store = _open(tmp_path, "null_keys", ENGINE_TYPE, OURS_DB)
    store.apply([key, view])
    client = redis.Redis.from_url(f"{_base_url()}/{OURS_DB}")
    client.flushdb()
    store.materialize(start_date=START, end_date=END)
    got = store.get_online_features(features=["v_fv:v"],
                                    entity_rows=[{"key": "a"}, {"key": "b"}]).to_dict()["v"]
    assert got == [1, 3] and client.dbsize() == 2
    client.flushdb()


# --- the real repo ------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_repo_views_materialize_identically_with_both_engines(
    store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's feature data through feature_store.yaml's engine and through `local`."""
    yaml = (PROJECT / "feature_repo" / "feature_store.yaml").read_text()
    stock_yaml = re.sub(r"^batch_engine:.*\n(?:[ \t]+.*\n)*", "batch_engine: local\n", yaml,
                        flags=re.MULTILINE)
    assert ENGINE_TYPE in yaml and ENGINE_TYPE not in stock_yaml
    end = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
    base = _base_url()
    hashes = []
    for db, text in [(OURS_DB, yaml), (STOCK_DB, stock_yaml)]:
        path = tmp_path / f"feature_store_{db}.yaml"
        path.write_text(text)
        monkeypatch.setenv("REDIS_URL", f"{base}/{db}")  # read when the config is loaded
        repo_store = FeatureStore(repo_path=str(PROJECT / "feature_repo"), fs_yaml_file=path)
        client = redis.Redis.from_url(f"{base}/{db}")
        client.flushdb()
        try:
            repo_store.materialize(start_date=START, end_date=end)
            hashes.append(_hashes(client))
        finally:
            client.flushdb()
    assert len(hashes[0]) > 300
    assert hashes[0] == hashes[1]
