"""Connections to the online store's Redis, made in one place from Feast's online store config.

`is_plain_redis` says whether this package serves a store (a single Redis node); Redis Cluster
and Sentinel (`redis_type` of Feast's config) go through Feast's own store until they are
supported here, and that support starts in this module.
"""

from __future__ import annotations

import json
from typing import Any

import redis
import redis.asyncio
from feast.infra.online_stores.redis import RedisOnlineStoreConfig, RedisType
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry


def is_plain_redis(online_store: Any) -> bool:
    """Whether Feast's online store config (`RepoConfig.online_store`) is a single-node Redis,
    the only kind this package's readers and writers talk to."""
    return (isinstance(online_store, RedisOnlineStoreConfig)
            and online_store.redis_type == RedisType.redis)


def client_kwargs(connection_string: str) -> dict[str, Any]:
    """redis-py keyword arguments for Feast's `host:port,key=value,...` string (single node);
    values are JSON when they parse as JSON (numbers, booleans), else strings."""
    kwargs: dict[str, Any] = {}
    for part in connection_string.split(","):
        if "=" in part:
            key, raw = part.split("=", 1)
            try:
                kwargs[key] = json.loads(raw)
            except json.JSONDecodeError:
                kwargs[key] = raw
        elif "host" not in kwargs:
            host, _, port = part.partition(":")
            kwargs["host"], kwargs["port"] = host, int(port or 6379)
    return kwargs


def connect(connection_string: str, *, socket_timeout_s: float | None = None,
            fail_fast: bool = False) -> redis.Redis:
    """A client for Feast's connection string.

    `socket_timeout_s`: the read timeout is at least this (a writer's script call may outlast
    the store's own timeout, which is sized for serving).  `fail_fast`: one immediate retry
    (a pooled connection may be stale after a Redis restart) instead of redis-py's default
    retries with growing sleeps.
    """
    kwargs = client_kwargs(connection_string)
    if socket_timeout_s is not None:
        kwargs["socket_timeout"] = max(float(kwargs.get("socket_timeout") or 0), socket_timeout_s)
    if fail_fast:
        kwargs["retry"] = Retry(NoBackoff(), 1)
    return redis.Redis(**kwargs)


def redis_client(online_store: Any, *, socket_timeout_s: float | None = None,
                 fail_fast: bool = False) -> redis.Redis:
    """A client for the online store (see `connect`); ValueError unless `is_plain_redis`."""
    _require_plain(online_store)
    return connect(online_store.connection_string, socket_timeout_s=socket_timeout_s,
                   fail_fast=fail_fast)


def async_redis_client(online_store: Any) -> redis.asyncio.Redis:
    """An asyncio client for the online store, failing fast as `connect(fail_fast=True)`;
    ValueError unless `is_plain_redis`."""
    _require_plain(online_store)
    kwargs = client_kwargs(online_store.connection_string)
    return redis.asyncio.Redis(**kwargs, retry=AsyncRetry(NoBackoff(), 1))


def _require_plain(online_store: Any) -> None:
    if not is_plain_redis(online_store):
        raise ValueError(f"not a single-node Redis online store: {online_store!r}")
