"""Writing to a Redis Cluster: every script call's keys in one hash slot, on the node owning it.

Redis Cluster runs a script only when all its keys hash to one slot, and only on the primary
that owns the slot.  Feast's keys (`wire`) carry no hash tag we could choose, so a batch is
sorted by slot (`by_slot`), each slot's keys go in calls of their own, and each primary gets
its calls on a connection of its own, pipelined, all primaries at once (`ClusterSender`).  The
script is loaded once per connection (`SCRIPT LOAD`) and called by its digest (`EVALSHA`), so a
call of a few keys does not carry the script's text.

The slot map is redis-py's (`RedisCluster.nodes_manager`), read when the client starts and
refreshed when a reply says it changed (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) or a node cannot be
reached: `ScriptWriter` then resends the batch (safe: the script never rolls a key back).
"""

from __future__ import annotations

import numpy as np
import redis
from redis.connection import Connection
from redis.crc import key_slot

from feature_repo.redis_store.encode import EncodedRows
from feature_repo.redis_store.script import CallPlan

Run = tuple[int, int]  # a range of rows, all of one slot


def raw_keys(encoded: EncodedRows) -> list[bytes]:
    """The Redis keys of a batch (its `keys` are framed as protocol bulk strings)."""
    return [k[k.index(b"\r\n") + 2:-2] for k in encoded.keys.to_pylist()]


def by_slot(encoded: EncodedRows) -> tuple[EncodedRows, list[int], list[Run]]:
    """The batch reordered by hash slot (rows of one slot keep their order), with the slot of
    each run of rows of one slot and the runs."""
    n = len(encoded.keys)
    if n == 0:
        return encoded, [], []
    slots = np.fromiter((key_slot(k) for k in raw_keys(encoded)), np.int64, n)
    order = np.argsort(slots, kind="stable")
    slots = slots[order]
    if not np.array_equal(order, np.arange(n)):
        encoded = EncodedRows(keys=encoded.keys.take(order), values=encoded.values.take(order),
                              values_per_row=encoded.values_per_row)
    bounds = [0, *(np.flatnonzero(np.diff(slots)) + 1).tolist(), n]
    runs = list(zip(bounds[:-1], bounds[1:], strict=True))
    return encoded, [int(slots[s]) for s, _ in runs], runs


class ClusterSender:
    """Sends a writer's batches to the primaries of a Redis Cluster (see the module docstring);
    one connection per primary, taken from the node's pool on first use."""

    def __init__(self, client: redis.RedisCluster, plan: CallPlan) -> None:
        self._client = client
        self._plan = plan
        self._conns: dict[str, tuple[redis.Redis, Connection]] = {}

    def send(self, encoded: EncodedRows) -> int:
        """Writes a batch; returns how many keys the script wrote."""
        encoded, slots, runs = by_slot(encoded)
        per_node: dict[str, list[Run]] = {}
        for slot, run in zip(slots, runs, strict=True):
            node = self._client.nodes_manager.get_node_from_slot(slot)
            per_node.setdefault(node.name, []).append(run)
        streams = [
            (self._connection(name),
             self._plan.calls(encoded, runs=node_runs, by_sha=True))
            for name, node_runs in per_node.items()
        ]
        return self._plan.send(streams)

    def _connection(self, node_name: str) -> Connection:
        if node_name not in self._conns:
            node = self._client.get_node(node_name=node_name)
            if node is None or node.redis_connection is None:
                raise redis.ConnectionError(f"no connection to cluster node {node_name}")
            client = node.redis_connection
            conn = client.connection_pool.get_connection()
            self._conns[node_name] = (client, conn)
            conn.send_command("SCRIPT", "LOAD", self._plan.script)
            conn.read_response()
        return self._conns[node_name][1]

    def reset(self, *, refresh: bool) -> None:
        """Drops every connection (replies may be unread); `refresh`: re-reads the slot map."""
        for client, conn in self._conns.values():
            conn.disconnect()
            client.connection_pool.release(conn)
        self._conns.clear()
        if refresh:
            self._client.nodes_manager.initialize()

    def close(self) -> None:
        self.reset(refresh=False)
        self._client.close()
