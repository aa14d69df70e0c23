"""The asyncio reader on one Redis node: every HMGET of a read in one script call (or, past
`_SCRIPT_MAX_KEYS` keys, in several in one pipeline).

`read_rows_async` answers exactly what the pipelined HMGETs of `read_rows` answer, for several
reads in one call (the scorer's user and merchant keys), unknown keys and empty reads, on the
session's materialized store; and it loads its script itself where Redis does not know it (a
fresh server, or after SCRIPT FLUSH), here on a private `redis-server`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from feature_repo.redis_store import reader as reader_module
from feature_repo.redis_store.client import async_redis_client, redis_client
from feature_repo.redis_store.reader import HashReader, Reads, read_rows, read_rows_async
from feature_repo.redis_store.wire import view_name
from tests.procs import redis_server
from training.retrieval import read_transactions

pytestmark = pytest.mark.integration

VIEWS = {"user_id": ("user_profile_fv", "user_velocity_fv"), "merchant_id": ("merchant_profile_fv",)}


def _reads(store: Any, ids: dict[str, list[str]]) -> Reads:
    config = store.config
    reads = []
    for join_key, names in VIEWS.items():
        views = [(view_name(store.get_feature_view(n), config),
                  [f.name for f in store.get_feature_view(n).features]) for n in names]
        reads.append((HashReader(config, join_key, views), ids[join_key]))
    return reads


def test_one_script_call_reads_what_the_pipeline_reads(materialized_store: Any,
                                                       feature_data: Path) -> None:
    log = read_transactions(feature_data)
    ids = {"user_id": sorted(set(log["user_id"]))[:300] + ["u-unknown", ""],
           "merchant_id": sorted(set(log["merchant_id"]))[:100] + ["m-unknown"]}
    reads = _reads(materialized_store, ids)
    online = materialized_store.config.online_store

    async def read(r: Reads) -> Any:
        client = async_redis_client(online)
        try:
            return await read_rows_async(client, r)
        finally:
            await client.aclose()

    expected = read_rows(redis_client(online), reads)
    assert sum(row is not None for entity in expected[0] for row in entity) > 300  # real rows
    assert asyncio.run(read(reads)) == expected
    with pytest.MonkeyPatch.context() as patch:  # several script calls in one pipeline
        for most in (50, 302, 403):
            patch.setattr(reader_module, "_SCRIPT_MAX_KEYS", most)
            assert asyncio.run(read(reads)) == expected
    empty = [(reads[0][0], []), reads[1]]
    assert asyncio.run(read(empty)) == [[], expected[1]]
    assert asyncio.run(read([])) == []


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    with redis_server(tmp_path / "redis.log") as url:
        client = redis.Redis.from_url(url)
        try:
            yield client
        finally:
            client.close()


@pytest.mark.parametrize("calls", [1, 2])
def test_the_script_is_loaded_where_redis_does_not_know_it(
        private_redis: redis.Redis, materialized_store: Any, monkeypatch: pytest.MonkeyPatch,
        calls: int) -> None:
    """One script call, or several in one pipeline (NOSCRIPT is the pipeline's error)."""
    monkeypatch.setattr(reader_module, "_SCRIPT_MAX_KEYS", 3 if calls == 1 else 2)
    reads = _reads(materialized_store, {"user_id": ["u1", "u2"], "merchant_id": ["m1"]})
    (user_reader, _), _ = reads
    stored = b"\x08\x01"  # a Timestamp of 1 s: a row
    private_redis.hset(user_reader.key("u1"),  # type: ignore[arg-type]
                       mapping={user_reader.fields[-1]: stored})
    port = private_redis.connection_pool.connection_kwargs["port"]

    async def read() -> Any:
        client = redis.asyncio.Redis(port=port)
        try:
            return await read_rows_async(client, reads)
        finally:
            await client.aclose()

    expected = read_rows(private_redis, reads)
    assert expected[0][0][-1] is not None  # the row written above
    assert asyncio.run(read()) == expected  # a fresh server: NOSCRIPT, loaded, answered
    private_redis.script_flush()
    assert asyncio.run(read()) == expected


def test_a_server_that_refuses_scripts_is_read_with_pipelines(
        private_redis: redis.Redis, materialized_store: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ACL user without EVALSHA (NOPERM): reads still answer, through pipelines, and the
    reader stops trying the script, also when the refused read was one of several calls."""
    monkeypatch.setattr(reader_module, "_script_allowed", True)
    reads = _reads(materialized_store, {"user_id": ["u1", "u2"], "merchant_id": ["m1"]})
    (user_reader, _), _ = reads
    private_redis.hset(user_reader.key("u1"),  # type: ignore[arg-type]
                       mapping={user_reader.fields[-1]: b"\x08\x01"})
    private_redis.acl_setuser("reader", enabled=True, passwords=["+pw"], keys=["*"],
                              commands=["+@read", "+ping", "-evalsha", "-script"])
    port = private_redis.connection_pool.connection_kwargs["port"]

    async def read(r: Reads) -> Any:
        client = redis.asyncio.Redis(port=port, username="reader", password="pw")
        try:
            return await read_rows_async(client, r)
        finally:
            await client.aclose()

    expected = read_rows(private_redis, reads)
    assert asyncio.run(read(reads)) == expected
    assert reader_module._script_allowed is False
    assert asyncio.run(read(reads)) == expected

    monkeypatch.setattr(reader_module, "_script_allowed", True)
    many = _reads(materialized_store, {"user_id": [f"u{i}" for i in range(600)],
                                       "merchant_id": ["m1"]})
    assert asyncio.run(read(many)) == read_rows(private_redis, many)  # two calls, refused
    assert reader_module._script_allowed is False


def test_a_server_without_evalsha_is_read_with_pipelines_also_in_several_calls(
        tmp_path: Path, materialized_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server where EVALSHA is not a command ("unknown command", a proxy or a renamed
    command): a read of several script calls (one pipeline, whose error redis-py rewrites)
    falls back to pipelines like a read of one call."""
    with redis_server(tmp_path / "redis.log", "--rename-command", "EVALSHA", "") as url:
        for users in (2, 600):  # one script call, then several in one pipeline
            monkeypatch.setattr(reader_module, "_script_allowed", True)
            reads = _reads(materialized_store, {"user_id": [f"u{i}" for i in range(users)],
                                                "merchant_id": ["m1"]})
            expected = read_rows(redis.Redis.from_url(url), reads)

            async def read(r: Reads = reads) -> Any:
                client = redis.asyncio.Redis.from_url(url)
                try:
                    return await read_rows_async(client, r)
                finally:
                    await client.aclose()

            assert asyncio.run(read()) == expected
            assert reader_module._script_allowed is False
