"""The stream's online writer and its state seeder on a 3-master Redis Cluster (`REDIS_MODE=cluster`).

* `online_writer` picks the project's writer (`RedisOnlineWriter`, the newer-row-wins script
  routed per hash slot) for a cluster and leaves, byte for byte, what Feast's own
  `write_to_online_store` leaves there; older and equally old rows change nothing.
* `OnlineStateSeeder` reads the cluster directly (redis-py's cluster pipeline) and gets what
  Feast's `online_read` on the cluster gets, for the users `feast materialize` wrote and for
  unknown ones.
"""

from __future__ import annotations

from typing import Any

import pytest

from devenv.redis_cluster import LocalRedisCluster
from feature_repo.config import REPO_DIR
from streaming.seeding import OnlineStateSeeder
from streaming.velocity_sink import (
    VELOCITY_VIEW,
    RedisOnlineWriter,
    VelocityRow,
    history_table,
    newest_per_user,
    online_writer,
)
from tests.integration.streaming.sink_rows import SECOND, hashes, velocity_rows


def _keys(redis_cluster: LocalRedisCluster) -> set[bytes]:
    out: set[bytes] = set()
    for port in redis_cluster.ports:
        with redis_cluster.node(port) as node:
            out |= set(node.scan_iter(match=b"*csink-u*", count=1000))
    return out


def test_stream_writer_on_the_cluster_matches_feast(
        materialized_cluster: Any, cluster_env: LocalRedisCluster) -> None:
    cluster: Any = cluster_env.client()
    rows = velocity_rows("csink")
    newest = [rows[i] for i in newest_per_user(rows)]
    materialized_cluster.write_to_online_store(VELOCITY_VIEW,
                                               df=history_table(newest).to_pandas())
    keys = _keys(cluster_env)
    assert len(keys) == 40
    assert len({cluster.get_node_from_key(k).name for k in keys}) == 3
    stock = hashes(cluster, keys)
    cluster.delete(*keys)

    writer = online_writer(REPO_DIR)
    assert isinstance(writer, RedisOnlineWriter)
    try:
        writer.write(rows, history_table(rows))
        writer.flush()
        assert _keys(cluster_env) == keys
        assert hashes(cluster, keys) == stock
        older = [r for r in rows if r not in newest]
        same_time = [VelocityRow(r.user_id, {**r.row, "recent_amounts": [9.0] * len(
            r.row["recent_amounts"])}, None) for r in newest]
        for batch in (older, same_time):
            writer.write(batch, history_table(batch))
            writer.flush()
            assert hashes(cluster, keys) == stock
    finally:
        writer.close()
        cluster.delete(*keys)
        cluster.close()


@pytest.mark.usefixtures("materialized_cluster")
def test_seeder_reads_the_cluster_as_feast_does(cluster_env: LocalRedisCluster) -> None:
    users = [f"u{i:03d}" for i in range(60)] + ["u-never-seen", "", "ü-✓"]
    seeder = OnlineStateSeeder(REPO_DIR)
    fast = seeder.read(users)
    assert seeder._redis is not None  # the direct read, not Feast's
    feast = seeder.read_through_feast(users)
    assert sum(r is not None for r in fast) >= 30, "the cluster should hold most users"
    assert [r and r[0] for r in fast] == [r and r[0] for r in feast]
    assert [r and r[1] // SECOND for r in fast] == [r and r[1] // SECOND for r in feast]
