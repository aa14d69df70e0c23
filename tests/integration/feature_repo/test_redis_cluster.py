"""The online store on a 3-master Redis Cluster (`REDIS_MODE=cluster`), against one Redis node.

The cluster is real (`tests/fixtures/redis_cluster.py`: three `redis-server --cluster-enabled`
processes joined by `redis-cli --cluster create`), and Feast's keys spread over its 16384 hash
slots, so every batch the writer sends and every read spans the three primaries.

* Synthetic repo (the one `test_materialization_engine` builds: string and int keys, every
  value type, nulls, NaNs, created-time tie-breaks, rows outside the window): our engine into
  the cluster leaves, byte for byte, the hashes Feast's stock engine leaves in one Redis node,
  and Feast's stock `get_online_features` on the cluster (`redis_type: redis_cluster`) answers
  what it answers on the node; a re-run and an older window roll nothing back; a stored newer
  row survives materialization; a view of 170 features with a key TTL (several HSETs and an
  EXPIRE per key) too.
* The real repo: `feast materialize` into the cluster leaves the hashes it leaves in a single
  node; the project's own reader (`redis_store.reader.read_rows` and `read_rows_async` on
  redis-py's cluster clients) returns exactly what Feast's stock `get_online_features` on the
  cluster returns, for every user and merchant and for unknown ones.
* The writer (`ScriptWriter` on a `RedisCluster`): a slot moved after it read the slot map
  (MOVED) and connections killed on every primary are retried; any other error stops it and
  nothing after it is written.
"""

from __future__ import annotations

import asyncio
import math
import os
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
from feast.types import Int64
from redis.crc import key_slot
from redis.exceptions import MovedError

from devenv.redis_cluster import LocalRedisCluster
from feature_repo.config import REPO_DIR, redis_connection_string
from feature_repo.materialization import ENGINE_TYPE
from feature_repo.redis_store.client import async_redis_client, redis_client
from feature_repo.redis_store.encode import EncodedRows, RowEncoder
from feature_repo.redis_store.reader import HashReader, read_rows, read_rows_async
from feature_repo.redis_store.wire import field_name, key_encoder, view_name
from feature_repo.redis_store.writer import ScriptWriter, WriteError, script_header, write_script
from tests.conftest import SIM_END
from tests.integration.feature_repo.test_materialization_engine import (
    BASE,
    END,
    N_NARROW,
    N_WIDE,
    START,
    _narrow_tables,
    _online,
    _views,
    _wide_table,
)
from training.retrieval import read_transactions

NODE_DB = 9  # this module's database of the session's single Redis node
SYNTHETIC = b"engine_test"  # the synthetic repo's project: the suffix of its keys
WIDE = b"wide_test"  # the 170-feature view's project
REPO = b"fraud"  # feature_store.yaml's project
Hashes = dict[bytes, dict[bytes, bytes]]


def _node_url(db: int = NODE_DB) -> str:
    return f"{os.environ['REDIS_URL'].rsplit('/', 1)[0]}/{db}"


def cluster_hashes(cluster: LocalRedisCluster, project: bytes) -> tuple[Hashes, list[int]]:
    """Every hash of `project` in the cluster (Feast's keys end with the project's name),
    read node by node, and how many such keys each primary holds."""
    out: Hashes = {}
    sizes = []
    for port in cluster.ports:
        with cluster.node(port) as n:
            node: Any = n
            keys = list(node.scan_iter(match=b"*" + project, count=1000))
            sizes.append(len(keys))
            out.update({k: node.hgetall(k) for k in keys})
    return out, sizes


def node_hashes(client: Any, project: bytes) -> Hashes:
    return {k: client.hgetall(k) for k in client.scan_iter(match=b"*" + project, count=1000)}


def node_delete(client: Any, project: bytes) -> None:
    """Delete `project`'s keys from the node's database (other tests' keys stay)."""
    keys = list(client.scan_iter(match=b"*" + project, count=1000))
    if keys:
        client.delete(*keys)


def _open(root: Path, name: str, engine: str, connection_string: str, redis_type: str,
          project: bytes = SYNTHETIC, **online: Any) -> FeatureStore:
    repo = root / name
    repo.mkdir(exist_ok=True)
    return FeatureStore(config=RepoConfig(
        project=project.decode(),
        provider="local",
        registry={"registry_type": "sql", "path": f"sqlite:///{repo / 'registry.db'}"},
        online_store={"type": "feature_repo.online_store.FraudRedisOnlineStore",
                      "connection_string": connection_string, "redis_type": redis_type,
                      **online},
        offline_store={"type": "feature_repo.offline_store.AsofDuckDBOfflineStore"},
        batch_engine={"type": engine},
        entity_key_serialization_version=3,
        repo_path=str(repo),
    ))


# --- a synthetic repo: our engine into the cluster, Feast's stock engine into one node ---------

@pytest.fixture(scope="module")
def synthetic(redis_cluster: LocalRedisCluster,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("cluster-engine")
    rng = np.random.default_rng(20)
    data = root / "data"
    (data / "narrow").mkdir(parents=True)
    wide_table = _wide_table(rng)
    pq.write_table(wide_table, data / "wide.parquet", row_group_size=2500)
    for i, part in enumerate(_narrow_tables(rng)):
        pq.write_table(part, data / "narrow" / f"part-{i}.parquet")
    objects, wide, narrow = _views(data)
    cluster_cs = redis_connection_string(redis_cluster.url, cluster=True)
    stores = {"cluster": _open(root, "cluster", ENGINE_TYPE, cluster_cs, "redis_cluster"),
              "node": _open(root, "node", "local", redis_connection_string(_node_url()),
                            "redis")}
    for s in stores.values():
        s.apply(objects)
    node = redis.Redis.from_url(_node_url())
    redis_cluster.delete_matching(b"*" + SYNTHETIC)
    node_delete(node, SYNTHETIC)
    stores["node"].materialize(start_date=START, end_date=END)
    yield {"stores": stores, "node": node, "wide": wide, "narrow": narrow,
           "wide_table": wide_table, "root": root, "objects": objects,
           "cluster_cs": cluster_cs}
    redis_cluster.delete_matching(b"*" + SYNTHETIC)
    node_delete(node, SYNTHETIC)


def test_engine_into_the_cluster_writes_what_stock_feast_writes_into_one_node(
        synthetic: dict[str, Any], redis_cluster: LocalRedisCluster) -> None:
    redis_cluster.delete_matching(b"*" + SYNTHETIC)
    synthetic["stores"]["cluster"].materialize(start_date=START, end_date=END)
    got, sizes = cluster_hashes(redis_cluster, SYNTHETIC)
    want = node_hashes(synthetic["node"], SYNTHETIC)
    assert len(want) > 0.9 * (N_WIDE + N_NARROW)
    assert all(size > 0.2 * len(want) for size in sizes), sizes  # every primary holds keys
    assert got == want

    # stock Feast reads the cluster as it reads the node (values and event times)
    wide_ids: list[Any] = [f"k{i:05d}-é" for i in range(N_WIDE)] + ["missing"]
    narrow_ids: list[Any] = [i * 7 - 3000 for i in range(N_NARROW)] + [10**9]
    for view, key, ids in [(synthetic["wide"], "key", wide_ids),
                           (synthetic["narrow"], "num_id", narrow_ids)]:
        assert _online(synthetic["stores"]["cluster"], view, key, ids) == \
            _online(synthetic["stores"]["node"], view, key, ids)

    # a re-run and an older window write nothing and roll nothing back
    synthetic["stores"]["cluster"].materialize(start_date=START, end_date=END)
    synthetic["stores"]["cluster"].materialize(start_date=START, end_date=BASE + timedelta(days=3))
    assert cluster_hashes(redis_cluster, SYNTHETIC)[0] == want


def test_a_newer_stored_row_survives_materialization_into_the_cluster(
        synthetic: dict[str, Any], redis_cluster: LocalRedisCluster) -> None:
    store = synthetic["stores"]["cluster"]
    table = synthetic["wide_table"].to_pandas()
    table = table[table["event_timestamp"] <= pd.Timestamp(END)]
    keys = sorted(set(table["key"]))[:50]
    redis_cluster.delete_matching(b"*" + SYNTHETIC)
    rows = table[table["key"].isin(keys)].groupby("key").tail(1).copy()
    rows["event_timestamp"] = END + timedelta(days=1)  # a stream wrote newer rows
    rows["created"] = rows["event_timestamp"]
    rows["i64"] = -7
    store.write_to_online_store("wide_fv", rows)  # Feast's own write, to the cluster
    store.materialize(start_date=START, end_date=END)
    got = store.get_online_features(features=["wide_fv:i64"],
                                    entity_rows=[{"key": k} for k in keys]).to_dict()["i64"]
    assert got == [-7] * len(keys)
    assert sum(cluster_hashes(redis_cluster, SYNTHETIC)[1]) > 0.9 * (N_WIDE + N_NARROW)


def test_wide_view_with_key_ttl_on_the_cluster(synthetic: dict[str, Any],
                                              redis_cluster: LocalRedisCluster) -> None:
    """170 features (several HSETs per key in the script) and `key_ttl_seconds` (EXPIRE)."""
    rng = np.random.default_rng(5)
    n, width = 400, 170
    root: Path = synthetic["root"]
    path = root / "many.parquet"
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
    cluster = _open(root, "many-cluster", ENGINE_TYPE, synthetic["cluster_cs"], "redis_cluster",
                    WIDE, key_ttl_seconds=3600)
    node = _open(root, "many-node", "local", redis_connection_string(_node_url()), "redis",
                 WIDE, key_ttl_seconds=3600)
    try:
        for s in (cluster, node):
            s.apply([key, view])
            s.materialize(start_date=START, end_date=END)
        got, _ = cluster_hashes(redis_cluster, WIDE)
        assert len(got) == n // 2
        assert got == node_hashes(synthetic["node"], WIDE)
        client: Any = redis_cluster.client()
        assert all(0 < client.ttl(k) <= 3600 for k in got)
    finally:
        redis_cluster.delete_matching(b"*" + WIDE)
        node_delete(synthetic["node"], WIDE)


# --- the real repo -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node_materialized(store: Any) -> Iterator[Hashes]:
    """The session's feature data materialized through feature_store.yaml into a fresh
    database of the single Redis node (standalone mode): its hashes."""
    end = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
    client = redis.Redis.from_url(_node_url())
    node_delete(client, REPO)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("REDIS_MODE", raising=False)
        mp.setenv("REDIS_URL", _node_url())
        node_store = FeatureStore(repo_path=str(REPO_DIR))
        assert node_store.config.online_store.redis_type == "redis"
    node_store.materialize(start_date=START, end_date=end)
    yield node_hashes(client, REPO)
    node_delete(client, REPO)


def test_repo_materialized_into_the_cluster_equals_standalone(
        materialized_cluster: Any, node_materialized: Hashes,
        redis_cluster: LocalRedisCluster) -> None:
    got, sizes = cluster_hashes(redis_cluster, REPO)
    assert len(node_materialized) > 300
    assert min(sizes) > 0
    assert got == node_materialized


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def test_our_reader_returns_what_feast_reads_from_the_cluster(
        materialized_cluster: Any, feature_data: Path) -> None:
    """`read_rows` (sync cluster pipeline) and `read_rows_async` (asyncio cluster pipeline)
    against Feast's stock `get_online_features` on the cluster, every view, every entity."""
    log = read_transactions(feature_data)
    store = materialized_cluster
    config = store.config
    entities = {"user_id": sorted(set(log["user_id"])) + ["u-cluster-unknown", "", "ü-✓"],
                "merchant_id": sorted(set(log["merchant_id"])) + ["m-cluster-unknown"]}
    sync_client = redis_client(config.online_store)
    assert isinstance(sync_client, redis.RedisCluster)
    compared = 0
    for name in ("user_profile_fv", "merchant_profile_fv", "user_velocity_fv"):
        view = store.get_feature_view(name)
        (join_key,) = view.join_keys
        ids = entities[join_key]
        features = [f.name for f in view.features]
        reader = HashReader(config, join_key, [(view_name(view, config), features)])

        async def read_async(reader: HashReader = reader, ids: list[str] = ids) -> Any:
            client = async_redis_client(config.online_store)
            try:
                return await read_rows_async(client, [(reader, ids)])
            finally:
                await client.aclose()

        (ours,) = read_rows(sync_client, [(reader, ids)])
        (ours_async,) = asyncio.run(read_async())
        assert ours_async == ours
        feast = store.get_online_features(
            features=[f"{name}:{f}" for f in features],
            entity_rows=[{join_key: i} for i in ids]).to_dict()
        for i, entity in enumerate(ids):
            (row,) = ours[i]
            if row is None:
                assert all(feast[f][i] is None for f in features), (name, entity)
                continue
            values = row.python()
            for f in features:
                assert _same(values[f], feast[f][i]), (name, entity, f, values[f], feast[f][i])
            compared += 1
    sync_client.close()
    assert compared > 300


# --- the writer on the cluster: redirections, dropped connections, errors ----------------------

T0 = 1_790_000_000_000_000


def _writer_parts() -> tuple[RowEncoder, Any]:
    encoder = RowEncoder(project="ctest", view_name="v", join_keys=[("k", ValueType.STRING.value)],
                         features=[("f", ValueType.INT64.value)], key_serialization_version=3)
    return encoder, key_encoder("k", 3, b"ctest")


def _batch(encoder: RowEncoder, keys: list[str], micros: int, value: int) -> EncodedRows:
    table = pa.table({"k": keys, "f": pa.array([value] * len(keys), pa.int64())})
    return encoder.encode(table, np.full(len(keys), micros))


def _move_slot(cluster: LocalRedisCluster, slot: int, to_port: int) -> None:
    """Reassign an empty slot to the node at `to_port` (every node told at once)."""
    with cluster.node(to_port) as target:
        target_id = target.cluster("MYID")
        target_id = target_id.decode() if isinstance(target_id, bytes) else target_id
    for port in cluster.ports:
        with cluster.node(port) as node:
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def _retried(caplog: pytest.LogCaptureFixture, error: type[BaseException]) -> bool:
    retried = [r for r in caplog.records if r.getMessage() == "Redis write failed, retrying"]
    caplog.clear()
    return any(r.exc_info and isinstance(r.exc_info[1], error) for r in retried)


def test_writer_follows_a_moved_slot_and_a_dropped_connection(
        redis_cluster: LocalRedisCluster, caplog: pytest.LogCaptureFixture) -> None:
    encoder, key = _writer_parts()
    names = [f"w{i}" for i in range(60)]
    client: Any = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0],
                                     client_name="cluster-writer-test")
    check: Any = redis_cluster.client()
    writer = ScriptWriter(client, write_script(1), script_header(encoder, ttl=0, force=False))
    def values(keys: list[str]) -> set[bytes]:
        return {check.hget(key(n), field_name("v", "f")) for n in keys}

    try:
        writer.send(_batch(encoder, names, T0, 1))
        assert writer.flush() == 60
        assert values(names) == {b"\x20\x01"}  # int64_val 1
        assert {check.get_node_from_key(key(n)).port for n in names} == set(redis_cluster.ports)

        # a slot moves after the writer read the slot map: MOVED, refresh, resend (the resent
        # keys written before the redirection are left alone: the same row is not newer)
        moved = "moved-key"
        slot = key_slot(key(moved))
        owner = check.get_node_from_key(key(moved)).port
        target = next(p for p in redis_cluster.ports if p != owner)
        _move_slot(redis_cluster, slot, target)
        writer.send(_batch(encoder, [moved, *names], T0 + 1, 2))
        writer.flush()
        assert _retried(caplog, MovedError)
        assert values([moved, *names]) == {b"\x20\x02"}
        with redis_cluster.node(target) as node:
            assert node.exists(key(moved))

        # every connection of the writer killed: retried on fresh ones
        killed = 0
        for port in redis_cluster.ports:
            with redis_cluster.node(port) as node:
                for c in node.client_list():
                    if c["name"] == "cluster-writer-test":
                        killed += node.client_kill_filter(_id=c["id"])
        assert killed >= 3
        writer.send(_batch(encoder, names, T0 + 2, 3))
        writer.flush()
        assert _retried(caplog, redis.ConnectionError)
        assert values(names) == {b"\x20\x03"}

        # any other error stops the writer: nothing after it is written
        check.set(key("bad"), "not a hash")
        writer.send(_batch(encoder, ["bad"], T0, 4))
        with pytest.raises(WriteError):
            writer.flush()
        with pytest.raises(WriteError):
            writer.send(_batch(encoder, ["after"], T0, 5))
        assert not check.exists(key("after"))
    finally:
        writer.close()
        for n in [*names, "moved-key", "bad", "after"]:
            check.delete(key(n))
        check.close()
