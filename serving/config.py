"""HTTP scorer settings from the environment (prefix `SERVING_`), via `get_settings()`: the
scoring core's (`scoring.config.ScoringSettings`) plus the server's own."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr

from feature_repo.config import apply_env_defaults
from feature_repo.contract import MAX_FUTURE_SECONDS_ENV, max_future_seconds
from scoring.config import ScoringSettings


class ServingSettings(ScoringSettings):
    host: str = "127.0.0.1"  # loopback by default; containers set 0.0.0.0
    port: int = 8000
    workers: int = 1
    reload_interval_s: float = 5.0  # poll the model registry for changes; 0 disables
    api_key: SecretStr | None = None  # if set, /v1/score* require it in X-API-Key
    admin_api_key: SecretStr | None = None  # /admin/* require it; unset: admin API disabled
    # event_timestamp may lie at most this far ahead: one setting for the API and the stream
    max_future_seconds: float = Field(
        default_factory=max_future_seconds,
        validation_alias=MAX_FUTURE_SECONDS_ENV)
    max_body_bytes: int = 1_000_000
    max_batch: Annotated[int, Field(ge=1, le=1000)] = 1000  # /v1/score/batch; the schema caps it at 1,000
    retry_after_seconds: int = 2
    # Admission limit: transactions being scored at once; past it, 503 "overloaded" at once
    # (serving/admission.py).  A batch larger than this alone is still admitted when idle.
    max_inflight_rows: Annotated[int, Field(ge=1)] = 2000
    log_level: str = "INFO"
    access_log: bool = False


@lru_cache
def get_settings() -> ServingSettings:
    apply_env_defaults()
    return ServingSettings()
