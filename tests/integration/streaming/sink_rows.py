"""Velocity rows as a micro-batch delivers them, and the Redis hashes they leave: shared by the
velocity sink's tests on one node (test_velocity_sink) and on a cluster
(test_redis_cluster_stream)."""

from __future__ import annotations

from typing import Any

from feature_repo.velocity import UserVelocityState
from streaming.velocity_sink import VelocityRow

T0 = 1_790_000_000_000_000
SECOND = 1_000_000


def velocity_rows(prefix: str) -> list[VelocityRow]:
    """Rows of 40 users (`<prefix>-u000`...), several per user, interleaved as a micro-batch
    delivers them."""
    states: dict[str, UserVelocityState] = {}
    out = []
    for i in range(150):
        user = f"{prefix}-u{i % 40:03d}"
        state = states.setdefault(user, UserVelocityState())
        row = state.apply(f"{prefix}-t{i}", T0 + i * SECOND + i % 7, 1.25 * (i % 11) + 0.5,
                          f"m{i % 9}")
        assert row is not None
        out.append(VelocityRow(user, row, None))
    return out


def hashes(client: Any, keys: set[bytes]) -> dict[bytes, dict[bytes, bytes]]:
    return {k: client.hgetall(k) for k in sorted(keys)}
