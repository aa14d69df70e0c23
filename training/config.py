"""Settings of the offline jobs, from the environment (prefix `TRAINING_`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from feature_repo.config import PROJECT_DIR, REPO_DIR, apply_env_defaults, data_dir


class TrainingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINING_")

    feature_repo: Path = REPO_DIR
    model_dir: Path = PROJECT_DIR / "artifacts" / "models"
    # where trained versions are registered: MODEL_REGISTRY_URL, as the scorers (scoring/config.py)
    model_registry_url: str | None = Field(
        default=None, validation_alias=AliasChoices("MODEL_REGISTRY_URL", "model_registry_url"))
    feature_service: str = "fraud_model_v1"
    ablation_feature_service: str = "fraud_model_v1_no_velocity"
    test_fraction: float = 0.25  # most recent share of the labelled period held out
    validation_fraction: float = 0.15  # the share before it: thresholds and calibration check
    max_fpr: float = 0.01  # recall is reported at this false-positive rate
    # alert budget the thresholds are chosen for (training/thresholds.py)
    max_review_rate: float = 0.01  # share of all transactions sent to manual review
    min_decline_precision: float = 0.9  # share of automatic declines that are fraud
    seed: int = 7

    @property
    def data_dir(self) -> Path:
        return data_dir()


@lru_cache
def get_settings() -> TrainingSettings:
    apply_env_defaults()
    return TrainingSettings()
