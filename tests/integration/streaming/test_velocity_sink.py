"""The stream sink's Redis writer against Feast's own online write of the same rows, and its
offline history writer.

`RedisOnlineWriter` (through `feature_repo.redis_store.writer`) must leave Redis exactly as `FeatureStore.write_to_online_store` does (byte
for byte, key for key), keep only each user's newest row of a batch, and never replace a
stored row with one that is older or equally new (replays rely on it).  The writer thread
underneath (`redis_store.writer.ScriptWriter`, shared with materialization) survives a dropped
connection and, after any other error, raises and writes nothing more.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import redis
from deltalake import DeltaTable
from feast.value_type import ValueType

from feature_repo import history
from feature_repo.config import REPO_DIR
from feature_repo.redis_store.encode import EncodedRows, RowEncoder
from feature_repo.redis_store.wire import key_encoder
from feature_repo.redis_store.writer import ScriptWriter, WriteError, script_header, write_script
from streaming import velocity_sink
from streaming.velocity_sink import (
    VELOCITY_VIEW,
    RedisOnlineWriter,
    VelocityRow,
    VelocitySink,
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


def test_offline_rows_are_committed_by_the_snapshot_and_read_by_every_reader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The history thread writes rows as they come (several row groups of one staged file)
    but the table holds them only once the snapshot has returned, one commit per snapshot;
    stock deltalake, DuckDB over the dataset and `history.live_files` read them as written."""
    monkeypatch.setattr(velocity_sink, "STAGE_ROWS", 32)  # several row groups per file
    directory = tmp_path / "history"
    part = VelocitySink(None, directory).build_part("sink", "p0", None)
    rows = velocity_rows("off")
    part.write_batch(rows[:100])
    time.sleep(0.2)  # the history thread has written what it was handed
    assert history.read(directory).num_rows == 0  # staged, not committed
    version = DeltaTable(str(directory)).version()
    part.snapshot()
    part.write_batch(rows[100:])
    part.snapshot()
    assert DeltaTable(str(directory)).version() == version + 2
    expected = history_table(rows).sort_by([("user_id", "ascending"), ("event_timestamp",
                                                                       "ascending")])
    stock = history.read(directory).drop_columns([history.ORIGIN])
    assert stock.sort_by([("user_id", "ascending"), ("event_timestamp", "ascending")]) \
        .equals(expected)
    assert set(history.read(directory, [history.ORIGIN])[history.ORIGIN].to_pylist()) == {
        "stream"}
    con = duckdb.connect()
    con.register("h", history.dataset(directory))
    files = [str(p) for p in history.live_files(directory)]
    for sql in ("SELECT user_id, recent_amounts FROM h",
                f"SELECT user_id, recent_amounts FROM read_parquet({files!r})"):
        assert sorted(con.sql(sql).fetchall()) == sorted(
            zip(expected["user_id"].to_pylist(), expected["recent_amounts"].to_pylist(),
                strict=True))
    con.close()
    part.close()


def test_a_failed_offline_write_fails_the_snapshot_and_commits_nothing(tmp_path: Path) -> None:
    """A failed write fails the snapshot, nothing queued after it is committed (the snapshot
    raises only once every queued task has run), its staged file is deleted, and every later
    write fails too."""
    directory = tmp_path / "history"
    part = VelocitySink(None, directory).build_part("sink", "p0", None)
    part.write_batch(velocity_rows("ok"))
    part.snapshot()
    version = DeltaTable(str(directory)).version()
    files = set(directory.rglob("*.parquet"))
    part.write_batch(velocity_rows("more"))
    offline = part._history  # noqa: SLF001 - a broken write, as no caller can make one
    assert offline is not None
    offline.add(pa.table({"not_the_schema": [1]}))
    with pytest.raises(ValueError, match="(?i)schema"):
        part.snapshot()
    assert DeltaTable(str(directory)).version() == version
    assert set(directory.rglob("*.parquet")) == files  # the half-written file is gone
    part.write_batch(velocity_rows("after"))
    with pytest.raises(RuntimeError, match="earlier offline history write failed"):
        part.snapshot()
    assert DeltaTable(str(directory)).version() == version


def test_a_staged_file_of_another_schema_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    """A staged file is checked against the table's schema as `append` is: rows of another
    schema are refused and never reach the table."""
    directory = tmp_path / "history"
    history.append(directory, history_table(velocity_rows("ok")), history.STREAM)
    other = pa.schema([pa.field("user_id", pa.int64()), *list(velocity_sink.HISTORY_SCHEMA)[1:]])
    with pytest.raises(ValueError, match="do not match the table's schema"):
        history.StagedFile(directory, other, history.STREAM)
    assert history.read(directory).num_rows == 150
