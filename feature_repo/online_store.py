"""Redis online store that takes its connection from `REDIS_URL` and `REDIS_MODE`, with bounded
timeouts.

Registered in feature_store.yaml as `feature_repo.online_store.FraudRedisOnlineStore`. It is
Feast's own Redis store (same key layout, same reads and writes), so stock
`get_online_features`, `feast materialize` and `feast serve` work unchanged; only the
connection settings differ:

* the connection comes from the conventional `REDIS_URL` (default redis://127.0.0.1:6379/0)
  unless `connection_string` is set in the YAML;
* `REDIS_MODE=cluster` makes it Feast's `redis_type: redis_cluster`, with `REDIS_URL` naming
  any node of the cluster (redis-py discovers the rest); `standalone` (the default) is one node.
  A `redis_type` written in the YAML wins over `REDIS_MODE`;
* socket connect/read timeouts are bounded (`socket_timeout_s`), so a Redis outage fails fast
  instead of hanging a request (`feature_repo.redis_store.client` builds this project's own
  connections, single node or cluster, from the same config);
* `require_env` lists environment variables the YAML expands: Feast builds this config while it
  reads feature_store.yaml, before the registry, so an unset one is reported in one line
  (`feature_repo.config.require_env`) instead of as the registry's SQLAlchemy traceback.
"""

from __future__ import annotations

import os
from typing import Literal

from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig, RedisType
from pydantic import StrictStr

from feature_repo.config import DEFAULT_REDIS_URL, redis_connection_string, redis_mode, require_env


class FraudRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """Feast's Redis config with the connection defaulting to `REDIS_URL` and `REDIS_MODE`."""

    # Feast picks the store class by `type`, so this subclass must narrow Feast's
    # Literal["redis"] to its own name: a deliberate incompatible override.
    type: Literal["feature_repo.online_store.FraudRedisOnlineStore"] = (
        "feature_repo.online_store.FraudRedisOnlineStore"  # type: ignore[assignment]
    )
    connection_string: StrictStr = ""
    socket_timeout_s: float = 0.5
    require_env: list[str] = []

    def model_post_init(self, __context: object) -> None:
        require_env(self.require_env)
        if "redis_type" not in self.model_fields_set:
            self.redis_type = (RedisType.redis_cluster if redis_mode() == "cluster"
                               else RedisType.redis)
        if not self.connection_string:
            self.connection_string = redis_connection_string(
                os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
                cluster=self.redis_type == RedisType.redis_cluster)
        if "socket_timeout" not in self.connection_string:
            t = self.socket_timeout_s
            self.connection_string += (
                f",socket_timeout={t},socket_connect_timeout={t},health_check_interval=10"
            )


class FraudRedisOnlineStore(RedisOnlineStore):
    """Feast's RedisOnlineStore, configured from the environment (see module docstring)."""
