"""Start-up and reload: find, verify and bind the model artifacts to the feature store.

What serves is decided, in order, by `SERVING_MODEL_VERSION` (a pin: that version alone), the
model registry `<model_dir>/registry.json` (its champion and challenger), or the newest version
directory in `model_dir`.  Every artifact is verified before it is unpickled: its sha256 against
its metadata and, for registered versions, against the hash recorded at registration; then its
feature service against the Feast registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from feast import FeatureStore

from serving.artifact import ArtifactError, check_against_registry, load_artifact
from serving.config import ServingSettings
from serving.features import OnlineFeatures
from serving.models import Challenger, ModelSet
from serving.scoring import Scorer, thresholds_for
from training.registry import Mode, Registry, RegistryError


@dataclass(frozen=True)
class ModelRef:
    path: Path
    sha256: str | None = None  # the registered hash, if the version is registered


@dataclass(frozen=True)
class ModelPlan:
    """What to serve, before anything is loaded."""

    champion: ModelRef
    source: str  # "pinned", "registry" or "newest"
    challenger: ModelRef | None = None
    mode: Mode = "shadow"
    share: float = 0.0


def resolve_plan(settings: ServingSettings) -> ModelPlan:
    """The pinned version, else the registry's champion and challenger, else the newest dir."""
    try:
        return _plan(settings)
    except RegistryError as exc:
        raise ArtifactError(f"model registry: {exc}") from exc


def _plan(settings: ServingSettings) -> ModelPlan:
    reg = Registry(settings.model_dir)
    state = reg.state() if reg.exists() else None

    def ref(version: str) -> ModelRef:
        entry = reg.entry(version, state)
        return ModelRef(settings.model_dir / entry["path"], entry["sha256"])

    if settings.model_version:
        if state is not None and settings.model_version in state["versions"]:
            return ModelPlan(ref(settings.model_version), "pinned")
        return ModelPlan(ModelRef(settings.model_dir / settings.model_version), "pinned")
    if state is not None and state["champion"]:
        spec = reg.challenger(state)
        if spec is None:
            return ModelPlan(ref(state["champion"]), "registry")
        return ModelPlan(ref(state["champion"]), "registry", ref(spec.version), spec.mode,
                         spec.share)
    versions = sorted(p for p in settings.model_dir.glob("*/metadata.json"))
    if not versions:
        raise ArtifactError(f"no model artifact under {settings.model_dir}: run `make train`")
    return ModelPlan(ModelRef(versions[-1].parent), "newest")


def resolve_model_path(settings: ServingSettings) -> Path:
    """Directory of the model that answers requests (the champion)."""
    return resolve_plan(settings).champion.path


def _scorer(ref: ModelRef, store: FeatureStore, settings: ServingSettings,
            features: dict[str, OnlineFeatures]) -> Scorer:
    artifact = load_artifact(ref.path, expected_sha256=ref.sha256)
    check_against_registry(artifact, store)
    service = artifact.feature_service
    if service not in features:  # models of one feature service share one lookup
        features[service] = OnlineFeatures(store, service)
    thresholds = thresholds_for(artifact, settings.review_threshold, settings.decline_threshold)
    try:
        return Scorer(artifact, features[service], thresholds)
    except ValueError as exc:
        raise ArtifactError(f"model {artifact.version}: {exc}") from exc


def build_model_set(settings: ServingSettings, store: FeatureStore) -> ModelSet:
    """Load and verify every model of the plan (blocking: run it off the event loop).

    Raises ArtifactError for anything that must not serve; nothing is half-built.
    """
    plan = resolve_plan(settings)
    features: dict[str, OnlineFeatures] = {}
    champion = _scorer(plan.champion, store, settings, features)
    challenger = None
    if plan.challenger is not None:
        challenger = Challenger(_scorer(plan.challenger, store, settings, features), plan.mode,
                                plan.share)
    return ModelSet(champion, challenger, plan.source)


def open_store(settings: ServingSettings) -> FeatureStore:
    return FeatureStore(repo_path=str(settings.feature_repo))


def load_scorer(settings: ServingSettings) -> Scorer:
    """The champion alone, with its own feature store (the streaming scorer's entry point)."""
    return _scorer(resolve_plan(settings).champion, open_store(settings), settings, {})
