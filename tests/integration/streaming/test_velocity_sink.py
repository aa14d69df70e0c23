"""The stream sink's Redis writer against Feast's own online write of the same rows.

`RedisOnlineWriter` (through `feature_repo.redis_store.writer`) must leave Redis exactly as `FeatureStore.write_to_online_store` does (byte
for byte, key for key), keep only each user's newest row of a batch, and never replace a
stored row with one that is older or equally new (replays rely on it).  The writer thread
underneath (`redis_store.writer.ScriptWriter`, shared with materialization) survives a dropped
connection and, after any other error, raises and writes nothing more.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import redis
from feast.value_type import ValueType

from feature_repo.config import REPO_DIR
from feature_repo.redis_store.encode import EncodedRows, RowEncoder
from feature_repo.redis_store.wire import key_encoder
from feature_repo.redis_store.writer import ScriptWriter, WriteError, script_header, write_script
from streaming.velocity_sink import (
    VELOCITY_VIEW,
    RedisOnlineWriter,
    VelocityRow,
    history_table,
    newest_per_user,
    online_writer,
)
from tests.integration.streaming.sink_rows import T0, hashes, velocity_rows


def test_redis_writer_matches_feast_and_never_rolls_back(store: Any, redis_client: Any) -> None:
    rows = velocity_rows("sink")
    newest = [rows[i] for i in newest_per_user(rows)]
    assert len(newest) == 40 and all(r.row is max(
        (x.row for x in rows if x.user_id == r.user_id), key=lambda row: row["row_ts_us"])
        for r in newest)

    before = set(redis_client.keys())
    store.write_to_online_store(VELOCITY_VIEW, df=history_table(newest).to_pandas())
    keys = set(redis_client.keys()) - before
    assert len(keys) == 40
    stock = hashes(redis_client, keys)
    redis_client.delete(*keys)

    writer = online_writer(REPO_DIR)
    assert isinstance(writer, RedisOnlineWriter)
    try:
        writer.write(rows, history_table(rows))
        writer.flush()
        assert set(redis_client.keys()) - before == keys
        assert hashes(redis_client, keys) == stock

        # older rows, and rows as old as the stored ones with other values, change nothing
        older = [r for r in rows if r not in newest]
        same_time = [VelocityRow(r.user_id, {**r.row, "recent_amounts": [9.0] * len(
            r.row["recent_amounts"])}, None) for r in newest]
        for batch in (older, same_time):
            writer.write(batch, history_table(batch))
            writer.flush()
            assert hashes(redis_client, keys) == stock
    finally:
        writer.close()
        redis_client.delete(*keys)


def test_script_writer_retries_a_dropped_connection_and_stops_at_an_error(
        redis_client: Any) -> None:
    encoder = RowEncoder(project="wtest", view_name="v", join_keys=[("k", ValueType.STRING.value)],
                         features=[("f", ValueType.INT64.value)], key_serialization_version=3)
    key = key_encoder("k", 3, b"wtest")
    kwargs = redis_client.connection_pool.connection_kwargs
    client = redis.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs.get("db", 0),
                         client_name="script-writer-test")

    def batch(keys: list[str], micros: int, value: int) -> EncodedRows:
        table = pa.table({"k": keys, "f": pa.array([value] * len(keys), pa.int64())})
        return encoder.encode(table, np.full(len(keys), micros))

    writer = ScriptWriter(client, write_script(1), script_header(encoder, ttl=0, force=False))
    try:
        writer.send(batch(["a", "b"], T0, 1))
        assert writer.flush() == 2
        (conn,) = [c for c in redis_client.client_list() if c["name"] == "script-writer-test"]
        redis_client.client_kill_filter(_id=conn["id"])
        writer.send(batch(["a"], T0 + 1, 2))  # on a dead connection: retried, then written
        assert writer.flush() == 3

        redis_client.set(key("c"), "not a hash")  # the script's HGET fails on it
        writer.send(batch(["c"], T0, 3))
        try:  # queued behind the failing batch, unless the failure is already known
            writer.send(batch(["d"], T0, 4))
        except WriteError:
            pass
        with pytest.raises(WriteError):
            writer.flush()
        with pytest.raises(WriteError):
            writer.send(batch(["e"], T0, 5))
        assert not redis_client.exists(key("d")) and not redis_client.exists(key("e"))
    finally:
        writer.close()
        redis_client.delete(*(key(k) for k in "abcde"))
