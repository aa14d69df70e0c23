"""Connections to the online store's Redis, made in one place from Feast's online store config.

`is_supported` says whether this package serves a store: a single Redis node
(`redis_type: redis`) or a Redis Cluster (`redis_type: redis_cluster`, `REDIS_MODE=cluster`).
Sentinel goes through Feast's own store.  The connection string is Feast's
(`host:port[,host:port...],key=value,...`), so Feast and this package reach the same nodes with
the same options; for a cluster the `host:port`s are seed nodes and redis-py's cluster client
discovers the rest and which node owns which hash slot.
"""

from __future__ import annotations

import json
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from feast.infra.online_stores.redis import RedisOnlineStoreConfig, RedisType
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

SyncClient = redis.Redis | redis.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.RedisCluster


def is_supported(online_store: Any) -> bool:
    """Whether Feast's online store config (`RepoConfig.online_store`) is a Redis this
    package's readers and writers talk to: a single node or a Redis Cluster."""
    return (isinstance(online_store, RedisOnlineStoreConfig)
            and online_store.redis_type in (RedisType.redis, RedisType.redis_cluster))


def is_cluster(online_store: Any) -> bool:
    """Whether Feast's online store config is a Redis Cluster."""
    return (isinstance(online_store, RedisOnlineStoreConfig)
            and online_store.redis_type == RedisType.redis_cluster)


def parse(connection_string: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Feast's `host:port[,host:port...],key=value,...` string -> the (host, port) nodes and
    redis-py keyword arguments; values are JSON when they parse as JSON (numbers, booleans),
    else strings."""
    nodes: list[tuple[str, int]] = []
    kwargs: dict[str, Any] = {}
    for part in connection_string.split(","):
        if "=" in part:
            key, raw = part.split("=", 1)
            try:
                kwargs[key] = json.loads(raw)
            except json.JSONDecodeError:
                kwargs[key] = raw
        elif part:
            host, _, port = part.partition(":")
            nodes.append((host, int(port or 6379)))
    if not nodes:
        raise ValueError(f"no host:port in the Redis connection string {connection_string!r}")
    return nodes, kwargs


def connect(connection_string: str, *, cluster: bool = False,
            socket_timeout_s: float | None = None, fail_fast: bool = False) -> SyncClient:
    """A client for Feast's connection string: `redis.Redis`, or `redis.RedisCluster` seeded
    with the string's nodes when `cluster`.

    `socket_timeout_s`: the read timeout is at least this (a writer's script call may outlast
    the store's own timeout, which is sized for serving).  `fail_fast`: one immediate retry
    (a pooled connection may be stale after a Redis restart) instead of redis-py's default
    retries with growing sleeps.
    """
    nodes, kwargs = parse(connection_string)
    if socket_timeout_s is not None:
        kwargs["socket_timeout"] = max(float(kwargs.get("socket_timeout") or 0), socket_timeout_s)
    if fail_fast:
        kwargs["retry"] = Retry(NoBackoff(), 1)
    if cluster:
        kwargs.pop("db", None)  # a cluster has database 0 only
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes], **kwargs)
    (host, port), = nodes[:1]
    return redis.Redis(host=host, port=port, **kwargs)


def redis_client(online_store: Any, *, socket_timeout_s: float | None = None,
                 fail_fast: bool = False) -> SyncClient:
    """A client for the online store (see `connect`); ValueError unless `is_supported`."""
    _require_supported(online_store)
    return connect(online_store.connection_string, cluster=is_cluster(online_store),
                   socket_timeout_s=socket_timeout_s, fail_fast=fail_fast)


def async_redis_client(online_store: Any) -> AsyncClient:
    """An asyncio client for the online store (`redis.asyncio.RedisCluster` for a cluster),
    failing fast as `connect(fail_fast=True)`; ValueError unless `is_supported`."""
    _require_supported(online_store)
    nodes, kwargs = parse(online_store.connection_string)
    retry = AsyncRetry(NoBackoff(), 1)
    if is_cluster(online_store):
        kwargs.pop("db", None)
        return redis.asyncio.RedisCluster(
            startup_nodes=[redis.asyncio.cluster.ClusterNode(h, p) for h, p in nodes],
            retry=retry, **kwargs)
    (host, port), = nodes[:1]
    client = redis.asyncio.Redis(host=host, port=port, retry=retry, **kwargs)
    pool = client.connection_pool
    if (HIREDIS_AVAILABLE and pool.connection_class is redis.asyncio.Connection
            and str(kwargs.get("encoding", "utf-8")).lower().replace("-", "") == "utf8"
            and kwargs.get("encoding_errors", "strict") == "strict"):
        pool.connection_class = HiredisPackingConnection  # before its first connection
    return client


class HiredisPackingConnection(redis.asyncio.Connection):
    """redis-py's asyncio TCP connection, its commands packed by hiredis in C, as redis-py's
    sync connection packs them when hiredis is installed (`HiredisRespSerializer`; its
    asyncio one packs in Python): the same bytes (UTF-8 strings, `repr` of numbers) at about
    a fifth of the CPU, which is a read's packing of up to 512 keys per script call.  Used
    only where redis-py would encode strings as strict UTF-8, as hiredis does."""

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._serializer.pack(*args)


def _require_supported(online_store: Any) -> None:
    if not is_supported(online_store):
        raise ValueError(f"not a single-node Redis or a Redis Cluster online store: "
                         f"{online_store!r}")
