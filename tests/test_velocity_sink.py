"""The stream sink's Redis writer against Feast's own online write of the same rows.

`RedisOnlineWriter` (through `feature_repo.redis_store.writer`) must leave Redis exactly as `FeatureStore.write_to_online_store` does (byte
for byte, key for key), keep only each user's newest row of a batch, and never replace a
stored row with one that is older or equally new (replays rely on it).
"""

from __future__ import annotations

from typing import Any

from feature_repo.config import REPO_DIR
from feature_repo.velocity import UserVelocityState
from streaming.velocity_sink import (
    VELOCITY_VIEW,
    RedisOnlineWriter,
    VelocityRow,
    history_table,
    newest_per_user,
    online_writer,
)

T0 = 1_790_000_000_000_000
SECOND = 1_000_000


def _rows() -> list[VelocityRow]:
    """Rows of 40 users, several per user, interleaved as a micro-batch delivers them."""
    states: dict[str, UserVelocityState] = {}
    out = []
    for i in range(150):
        user = f"sink-u{i % 40:03d}"
        state = states.setdefault(user, UserVelocityState())
        row = state.apply(f"sink-t{i}", T0 + i * SECOND + i % 7, 1.25 * (i % 11) + 0.5,
                          f"m{i % 9}")
        assert row is not None
        out.append(VelocityRow(user, row, None))
    return out


def _hashes(client: Any, keys: set[bytes]) -> dict[bytes, dict[bytes, bytes]]:
    return {k: client.hgetall(k) for k in sorted(keys)}


def test_redis_writer_matches_feast_and_never_rolls_back(store: Any, redis_client: Any) -> None:
    rows = _rows()
    newest = [rows[i] for i in newest_per_user(rows)]
    assert len(newest) == 40 and all(r.row is max(
        (x.row for x in rows if x.user_id == r.user_id), key=lambda row: row["row_ts_us"])
        for r in newest)

    before = set(redis_client.keys())
    store.write_to_online_store(VELOCITY_VIEW, df=history_table(newest).to_pandas())
    keys = set(redis_client.keys()) - before
    assert len(keys) == 40
    stock = _hashes(redis_client, keys)
    redis_client.delete(*keys)

    writer = online_writer(REPO_DIR)
    assert isinstance(writer, RedisOnlineWriter)
    try:
        writer.write(rows, history_table(rows))
        writer.flush()
        assert set(redis_client.keys()) - before == keys
        assert _hashes(redis_client, keys) == stock

        # older rows, and rows as old as the stored ones with other values, change nothing
        older = [r for r in rows if r not in newest]
        same_time = [VelocityRow(r.user_id, {**r.row, "recent_amounts": [9.0] * len(
            r.row["recent_amounts"])}, None) for r in newest]
        for batch in (older, same_time):
            writer.write(batch, history_table(batch))
            writer.flush()
            assert _hashes(redis_client, keys) == stock
    finally:
        writer.close()
        redis_client.delete(*keys)
