"""Start-up and reload: find, verify and bind the model artifacts to the feature store.

What serves is decided by `SERVING_MODEL_VERSION` (a pin: that version alone) or else by the
MLflow model registry at `MODEL_REGISTRY_URL` (scoring/registry.py: its `champion` and
`challenger` aliases).  Every artifact is verified before it is unpickled: its sha256 against
the hash the registry recorded at registration (a model version tag) and against its metadata;
then its feature service against the Feast registry.

Fail closed: the trust anchor is the registry.  A version serves only if the registry names it
(as champion, challenger or pin) with the hash it recorded; a registry that is missing, empty,
unreachable, unreadable or inconsistent (no champion, an alias on a version registered without
a path and hash, an unknown pinned version) is refused, and a running scorer keeps what it
serves.
Artifact directories are not trusted by their presence: the "newest directory" fallback and
pins of unregistered versions exist only behind `SERVING_ALLOW_UNREGISTERED_MODELS`, a
development flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feast import FeatureStore

from scoring.artifact import ArtifactError, check_against_registry, load_artifact
from scoring.config import ScoringSettings
from scoring.features import OnlineFeatures
from scoring.models import Challenger, ModelSet
from scoring.registry import Mode, Registry, RegistryError, check_consistent
from scoring.scorer import Scorer, thresholds_for

RegistryState = dict[str, Any] | RegistryError  # what reading the registry gave


@dataclass(frozen=True)
class ModelRef:
    path: Path
    sha256: str | None = None  # the registered hash, if the version is registered


@dataclass(frozen=True)
class ModelPlan:
    """What to serve, before anything is loaded."""

    champion: ModelRef
    source: str  # "pinned", "registry" or "newest" (development flag only)
    challenger: ModelRef | None = None
    mode: Mode = "shadow"
    share: float = 0.0


def resolve_plan(settings: ScoringSettings, state: RegistryState | None = None) -> ModelPlan:
    """The pinned version, else the registry's champion and challenger (fail closed).

    `state`: the registry as just read (`Registry.state()` or the RegistryError it raised), to
    plan from without reading it again; default: read it now."""
    try:
        return _plan(settings, state)
    except RegistryError as exc:
        raise ArtifactError(f"model registry: {exc}") from exc


def _plan(settings: ScoringSettings, read: RegistryState | None) -> ModelPlan:
    reg = Registry(settings.model_dir, settings.model_registry_url)
    dev = settings.allow_unregistered_models
    state: dict[str, Any] | None
    try:
        if read is None:
            read = reg.state()
        if isinstance(read, RegistryError):
            raise read
        # an empty state: no registered model (or no registry file) at all
        state = check_consistent(read) if read["versions"] else None
    except RegistryError:
        if not dev:
            raise
        state = None

    def ref(version: str) -> ModelRef:
        entry = reg.entry(version, state)
        return ModelRef(settings.model_dir / entry["path"], entry["sha256"])

    pin = settings.model_version
    if pin:
        if state is not None and pin in state["versions"]:
            return ModelPlan(ref(pin), "pinned")
        if dev:
            return ModelPlan(ModelRef(settings.model_dir / pin), "pinned")
        raise RegistryError(
            f"SERVING_MODEL_VERSION={pin} is not registered in {reg}: register it "
            "(python -m training.registry register DIR) or, in development only, set "
            "SERVING_ALLOW_UNREGISTERED_MODELS=true")
    if state is not None and state["champion"]:
        spec = reg.challenger(state)
        if spec is None:
            return ModelPlan(ref(state["champion"]), "registry")
        return ModelPlan(ref(state["champion"]), "registry", ref(spec.version), spec.mode,
                         spec.share)
    if not dev:
        problem = "does not exist" if state is None else "names no champion"
        raise RegistryError(f"{reg} {problem}: nothing verified to serve (train, or "
                            "promote a registered version)")
    versions = sorted(p for p in settings.model_dir.glob("*/metadata.json"))
    if not versions:
        raise ArtifactError(f"no model artifact under {settings.model_dir}: run `make train`")
    return ModelPlan(ModelRef(versions[-1].parent), "newest")


def resolve_model_path(settings: ScoringSettings) -> Path:
    """Directory of the model that answers requests (the champion)."""
    return resolve_plan(settings).champion.path


def _scorer(ref: ModelRef, store: FeatureStore, settings: ScoringSettings,
            features: dict[str, OnlineFeatures]) -> Scorer:
    artifact = load_artifact(ref.path, expected_sha256=ref.sha256)
    check_against_registry(artifact, store)
    service = artifact.feature_service
    if service not in features:  # models of one feature service share one lookup
        features[service] = OnlineFeatures(store, service, settings.lookup_timeout_s)
    thresholds = thresholds_for(artifact, settings.review_threshold, settings.decline_threshold)
    try:
        return Scorer(artifact, features[service], thresholds)
    except ValueError as exc:
        raise ArtifactError(f"model {artifact.version}: {exc}") from exc


def build_model_set(settings: ScoringSettings, store: FeatureStore,
                    state: RegistryState | None = None) -> ModelSet:
    """Load and verify every model of the plan (blocking: run it off the event loop).

    Raises ArtifactError for anything that must not serve; nothing is half-built.
    """
    plan = resolve_plan(settings, state)
    features: dict[str, OnlineFeatures] = {}
    champion = _scorer(plan.champion, store, settings, features)
    challenger = None
    if plan.challenger is not None:
        challenger = Challenger(_scorer(plan.challenger, store, settings, features), plan.mode,
                                plan.share)
    return ModelSet(champion, challenger, plan.source)


def open_store(settings: ScoringSettings) -> FeatureStore:
    return FeatureStore(repo_path=str(settings.feature_repo))


def load_scorer(settings: ScoringSettings) -> Scorer:
    """The champion alone, with its own feature store (the streaming scorer's entry point)."""
    return _scorer(resolve_plan(settings).champion, open_store(settings), settings, {})
