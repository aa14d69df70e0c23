"""Start-up: find, verify and bind the model artifact to the feature store."""

from __future__ import annotations

from pathlib import Path

from feast import FeatureStore

from serving.artifact import ArtifactError, check_against_registry, load_artifact
from serving.config import ServingSettings
from serving.features import OnlineFeatures
from serving.scoring import Scorer, thresholds_for


def resolve_model_path(settings: ServingSettings) -> Path:
    """`model_dir/model_version`, or the newest version directory in model_dir."""
    if settings.model_version:
        return settings.model_dir / settings.model_version
    versions = sorted(p for p in settings.model_dir.glob("*/metadata.json"))
    if not versions:
        raise ArtifactError(f"no model artifact under {settings.model_dir}: run `make train`")
    return versions[-1].parent


def load_scorer(settings: ServingSettings) -> Scorer:
    """Load + verify the artifact (hash, feature service) and open the store once."""
    artifact = load_artifact(resolve_model_path(settings))
    store = FeatureStore(repo_path=str(settings.feature_repo))
    check_against_registry(artifact, store)
    features = OnlineFeatures(store, artifact.feature_service)
    thresholds = thresholds_for(artifact, settings.review_threshold, settings.decline_threshold)
    return Scorer(artifact, features, thresholds)
