"""Settings of the scoring core (prefix `SERVING_`, shared by every scorer), via
`get_settings()`: which model serves, how features are looked up, the prediction log and
drift.  The HTTP scorer's own settings (`serving.config.ServingSettings`) extend these."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from feature_repo.config import PROJECT_DIR, REPO_DIR, apply_env_defaults


class ScoringSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVING_")

    model_dir: Path = PROJECT_DIR / "artifacts" / "models"
    model_version: str | None = None  # pins a registered version; default: the registry's champion
    # The MLflow model registry (scoring/registry.py), shared by every runtime: MODEL_REGISTRY_URL
    # (sqlite:///..., postgresql+psycopg://..., http(s)://mlflow-server); default SQLite in model_dir
    model_registry_url: str | None = Field(
        default=None, validation_alias=AliasChoices("MODEL_REGISTRY_URL", "model_registry_url"))
    # Development only: serve an unregistered pin, or the newest artifact directory when the
    # registry is missing.  Off, the scorer fails closed (scoring/loader.py).
    allow_unregistered_models: bool = False
    feature_repo: Path = REPO_DIR
    review_threshold: float | None = None  # default: from the model metadata
    decline_threshold: float | None = None
    # Deadline of a request's online lookup: past it the answer is a 503, whatever Redis does
    # (each socket operation is also bounded by the online store's own 0.5 s timeouts).
    lookup_timeout_s: Annotated[float, Field(gt=0)] = 0.5
    # Prediction log (scoring/prediction_log.py) and drift gauges (scoring/drift.py)
    prediction_log_sample: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0  # share, by txn id
    prediction_log_kafka: str | None = None  # bootstrap servers: log to the `predictions` topic
    prediction_log_dir: Path | None = None  # local parquet log, read by `training.skew_audit`
    prediction_log_flush_records: Annotated[int, Field(ge=1)] = 1000  # flush after N records
    prediction_log_flush_seconds: Annotated[float, Field(gt=0)] = 5.0  # ... or T s, if sooner
    drift_window: Annotated[int, Field(ge=1)] = 5000  # most recent vectors the PSI is taken over
    drift_interval_seconds: Annotated[float, Field(gt=0)] = 60.0  # `fraud_feature_psi` refresh


@lru_cache
def get_settings() -> ScoringSettings:
    apply_env_defaults()
    return ScoringSettings()
