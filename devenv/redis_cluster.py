"""A throw-away local Redis Cluster (no persistence, no replicas), for tests and benchmarks.

`start(directory)` runs `redis-server --cluster-enabled yes` on free loopback ports (each node's
cluster bus listens on its port + 10000, so ports stay below 55536), joins them with
`redis-cli --cluster create ... --cluster-yes`, and returns once every node reports
`cluster_state:ok`.  Point the project at it with `REDIS_MODE=cluster` and
`REDIS_URL=<LocalRedisCluster.url>`.  `stop()` (or leaving the `with` block) ends the nodes.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

MASTERS = 3
BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000
START_TIMEOUT_S = 30.0


class ClusterUnavailableError(RuntimeError):
    """redis-server or redis-cli is not installed."""


@dataclass
class LocalRedisCluster:
    """A local Redis Cluster: its nodes' ports and the processes serving them."""

    ports: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """`REDIS_URL` of a seed node (any node would do)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.ports[0])

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (for per-node work: SCAN, FLUSHALL, CLUSTER ...)."""
        return redis.Redis(host="127.0.0.1", port=port)

    def flushall(self) -> None:
        for port in self.ports:
            with self.node(port) as n:
                n.flushall()

    def delete_matching(self, pattern: bytes) -> int:
        """Delete every key matching the glob `pattern` (e.g. `b"*" + project`: Feast's keys
        end with the project's name), node by node, one key per command (a command's keys
        must share a slot); returns how many were deleted."""
        deleted = 0
        for port in self.ports:
            with self.node(port) as n:
                keys = list(n.scan_iter(match=pattern, count=1000))
                with n.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.delete(key)
                    deleted += sum(pipe.execute())
        return deleted

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> LocalRedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_ports(n: int) -> list[int]:
    """`n` free loopback ports P whose cluster bus port P + 10000 is free too."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20_000, 45_000)
        if port not in ports and _bindable(port) and _bindable(port + BUS_OFFSET):
            ports.append(port)
    return ports


def start(directory: Path, masters: int = MASTERS) -> LocalRedisCluster:
    """Start `masters` cluster-enabled nodes with their files in `directory`, create the
    cluster and wait for `cluster_state:ok` on every node.  ClusterUnavailableError without
    the binaries; RuntimeError (with redis-cli's output) if the cluster does not form."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise ClusterUnavailableError("redis-server and redis-cli are needed for a Redis Cluster")
    directory.mkdir(parents=True, exist_ok=True)
    cluster = LocalRedisCluster(ports=free_ports(masters))
    try:
        for port in cluster.ports:
            cluster.procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000",
                 "--save", "", "--appendonly", "no", "--dir", str(directory)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in cluster.ports:
            _wait_for_ping(port)
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if created.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n"
                               f"{created.stderr}")
        _wait_for_state_ok(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_ping(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as node:
        while True:
            try:
                node.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _wait_for_state_ok(cluster: LocalRedisCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for port in cluster.ports:
        with cluster.node(port) as node:
            while node.cluster("INFO")["cluster_state"] != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {port}: cluster_state not ok after "
                                       f"{START_TIMEOUT_S:.0f} s")
                time.sleep(0.1)
