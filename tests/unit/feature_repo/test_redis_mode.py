"""`REDIS_MODE` and `REDIS_URL` -> Feast's online store config, and the clients made from it.

Standalone (the default) is Feast's `redis_type: redis` with `host:port,db=N`; cluster is
`redis_type: redis_cluster` with `host:port` and no database (Feast's format for clusters,
which redis-py's cluster client refuses a `db` in); a `redis_type` written in the YAML wins.
No Redis is contacted: redis-py's clients connect lazily (the cluster client is built from
the parsed string, not started, here).
"""

from __future__ import annotations

import pytest
import redis
import redis.asyncio
from feast.infra.online_stores.redis import RedisType

from feature_repo.config import redis_connection_string, redis_mode
from feature_repo.online_store import FraudRedisOnlineStoreConfig
from feature_repo.redis_store.client import (
    HiredisPackingConnection,
    async_redis_client,
    is_cluster,
    is_supported,
    parse,
    redis_client,
)


def _config(monkeypatch: pytest.MonkeyPatch, mode: str | None, url: str,
            **yaml: object) -> FraudRedisOnlineStoreConfig:
    if mode is None:
        monkeypatch.delenv("REDIS_MODE", raising=False)
    else:
        monkeypatch.setenv("REDIS_MODE", mode)
    monkeypatch.setenv("REDIS_URL", url)
    return FraudRedisOnlineStoreConfig(**yaml)  # type: ignore[arg-type]


def test_standalone_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch, None, "redis://10.0.0.5:6380/3")
    assert config.redis_type == RedisType.redis
    assert config.connection_string.startswith("10.0.0.5:6380,db=3,socket_timeout=0.5,")
    assert is_supported(config) and not is_cluster(config)
    client = redis_client(config)
    assert isinstance(client, redis.Redis)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("10.0.0.5", 6380, 3)


def test_cluster_mode_is_feasts_redis_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch, " Cluster ", "redis://:s3cret@10.0.0.7:7000/0")
    assert config.redis_type == RedisType.redis_cluster
    assert config.connection_string == (
        "10.0.0.7:7000,password=s3cret,socket_timeout=0.5,socket_connect_timeout=0.5,"
        "health_check_interval=10")
    assert is_supported(config) and is_cluster(config)
    nodes, kwargs = parse(config.connection_string)
    assert nodes == [("10.0.0.7", 7000)]
    assert "db" not in kwargs and kwargs["password"] == "s3cret"


def test_yaml_redis_type_wins_over_redis_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch, "cluster", "redis://h:1/0", redis_type="redis")
    assert config.redis_type == RedisType.redis
    sentinel = _config(monkeypatch, None, "redis://h:1/0", redis_type="redis_sentinel",
                       connection_string="s1:26379,s2:26379")
    assert not is_supported(sentinel)  # Feast's own store serves Sentinel
    with pytest.raises(ValueError, match="not a single-node Redis or a Redis Cluster"):
        redis_client(sentinel)


def test_bad_settings_fail_with_the_variable_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_MODE", "sentinel")
    with pytest.raises(ValueError, match="REDIS_MODE must be one of standalone, cluster"):
        redis_mode()
    with pytest.raises(ValueError, match="REDIS_URL names database 2.*only database 0"):
        redis_connection_string("redis://h:7000/2", cluster=True)
    with pytest.raises(ValueError, match="REDIS_URL must start with redis://"):
        redis_connection_string("http://h:7000/0", cluster=True)


def test_several_seed_nodes_in_feasts_format() -> None:
    nodes, kwargs = parse("a:7000,b:7001,ssl=true,skip_full_coverage_check=true")
    assert nodes == [("a", 7000), ("b", 7001)]
    assert kwargs == {"ssl": True, "skip_full_coverage_check": True}
    with pytest.raises(ValueError, match="no host:port"):
        parse("db=0")


@pytest.mark.parametrize("args", [
    ("EVALSHA", "a" * 40, 3, b"k1", b"\x00\xff\r\n", "ü✓", -5, 2**70, 0.1, 1e300, -0.0, 1.5e-7),
    ("SCRIPT LOAD", "return 1"), (b"HMGET", b"k", b"f1"), ("PING",),
])
def test_the_asyncio_client_packs_with_hiredis_the_bytes_redis_py_packs(
        monkeypatch: pytest.MonkeyPatch, args: tuple[object, ...]) -> None:
    client = async_redis_client(_config(monkeypatch, None, "redis://10.0.0.5:6380/3"))
    assert client.connection_pool.connection_class is HiredisPackingConnection
    python = redis.asyncio.Connection(host="10.0.0.5")  # redis-py's own packing, in Python
    assert b"".join(HiredisPackingConnection(host="10.0.0.5").pack_command(*args)) == \
        b"".join(python.pack_command(*args))


def test_other_connections_keep_their_class(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch, None, "rediss://10.0.0.5:6380/3")  # TLS
    client = async_redis_client(config)
    assert client.connection_pool.connection_class is not HiredisPackingConnection
    for options in ("encoding=latin-1", "encoding_errors=surrogateescape"):
        # strings redis-py would encode otherwise than hiredis's strict UTF-8
        config = _config(monkeypatch, None, "redis://10.0.0.5:6380/3")
        config = config.model_copy(
            update={"connection_string": config.connection_string + "," + options})
        client = async_redis_client(config)
        assert client.connection_pool.connection_class is redis.asyncio.Connection
