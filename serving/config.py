"""Scorer settings from the environment (prefix `SERVING_`), obtained via `get_settings()`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from feature_repo.config import PROJECT_DIR, REPO_DIR, apply_env_defaults
from feature_repo.contract import MAX_FUTURE_SECONDS_ENV, max_future_seconds


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVING_")

    host: str = "127.0.0.1"  # loopback by default; containers set 0.0.0.0
    port: int = 8000
    workers: int = 1
    model_dir: Path = PROJECT_DIR / "artifacts" / "models"
    model_version: str | None = None  # pins a registered version; default: the registry's champion
    # Development only: serve an unregistered pin, or the newest artifact directory when the
    # registry is missing.  Off, the scorer fails closed (serving/loader.py).
    allow_unregistered_models: bool = False
    reload_interval_s: float = 5.0  # poll registry.json for changes; 0 disables
    api_key: SecretStr | None = None  # if set, /v1/score* require it in X-API-Key
    admin_api_key: SecretStr | None = None  # /admin/* require it; unset: admin API disabled
    feature_repo: Path = REPO_DIR
    review_threshold: float | None = None  # default: from the model metadata
    decline_threshold: float | None = None
    # event_timestamp may lie at most this far ahead: one setting for the API and the stream
    max_future_seconds: float = Field(
        default_factory=max_future_seconds,
        validation_alias=MAX_FUTURE_SECONDS_ENV)
    max_body_bytes: int = 1_000_000
    max_batch: Annotated[int, Field(ge=1, le=1000)] = 1000  # /v1/score/batch; the schema caps it at 1,000
    retry_after_seconds: int = 2
    # Deadline of a request's online lookup: past it the answer is a 503, whatever Redis does
    # (each socket operation is also bounded by the online store's own 0.5 s timeouts).
    lookup_timeout_s: Annotated[float, Field(gt=0)] = 0.5
    # Admission limit: transactions being scored at once; past it, 503 "overloaded" at once
    # (serving/admission.py).  A batch larger than this alone is still admitted when idle.
    max_inflight_rows: Annotated[int, Field(ge=1)] = 2000
    log_level: str = "INFO"
    access_log: bool = False
    # Prediction log (serving/prediction_log.py) and drift gauges (serving/drift.py)
    prediction_log_sample: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0  # share, by txn id
    prediction_log_kafka: str | None = None  # bootstrap servers: log to the `predictions` topic
    prediction_log_dir: Path | None = None  # local parquet log, read by `training.skew_audit`
    prediction_log_flush_records: Annotated[int, Field(ge=1)] = 1000  # flush after N records
    prediction_log_flush_seconds: Annotated[float, Field(gt=0)] = 5.0  # ... or T s, if sooner
    drift_window: Annotated[int, Field(ge=1)] = 5000  # most recent vectors the PSI is taken over
    drift_interval_seconds: Annotated[float, Field(gt=0)] = 60.0  # `fraud_feature_psi` refresh


@lru_cache
def get_settings() -> ServingSettings:
    apply_env_defaults()
    return ServingSettings()
