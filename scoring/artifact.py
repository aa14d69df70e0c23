"""Model artifacts: a joblib pipeline plus JSON metadata, verified before anything is unpickled.

Layout: `<model_dir>/<version>/model.joblib` and `<model_dir>/<version>/metadata.json`.  The
metadata records the version, the Feast feature service, the model's ordered input names, the
training window, metrics, library versions and the sha256 of model.joblib.  `load_artifact`
checks the hash *before* unpickling, so a tampered file is never executed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib

MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"


class ArtifactError(RuntimeError):
    """The artifact is missing, tampered with, or does not match the feature registry."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def service_feature_names(service: Any) -> list[str]:
    """Ordered output feature names of a Feast FeatureService (the model's input order)."""
    return [f.name for proj in service.feature_view_projections for f in proj.features]


@dataclass(frozen=True)
class Artifact:
    path: Path
    metadata: dict[str, Any]
    model: Any

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def feature_service(self) -> str:
        return str(self.metadata["feature_service"])

    @property
    def features(self) -> list[str]:
        return list(self.metadata["features"])


def save_artifact(directory: Path, model: Any, metadata: dict[str, Any]) -> Path:
    """Write model + metadata (with the model's sha256) into `directory`; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / MODEL_FILE
    joblib.dump(model, model_path)
    meta = {**metadata, "model_file": MODEL_FILE, "sha256": sha256_file(model_path)}
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False))
    return directory


def read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA_FILE
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"no model metadata at {path}") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"model metadata {path} is not valid JSON: {exc}") from exc
    for key in ("version", "feature_service", "features", "sha256"):
        if key not in meta:
            raise ArtifactError(f"model metadata {path} lacks {key!r}")
    return meta


def load_artifact(directory: Path, expected_sha256: str | None = None) -> Artifact:
    """Verify the model file's sha256 (against the metadata and, when given, against the hash
    recorded when the version was registered), then unpickle it."""
    meta = read_metadata(directory)
    model_path = directory / meta.get("model_file", MODEL_FILE)
    if not model_path.is_file():
        raise ArtifactError(f"model file {model_path} is missing")
    actual = sha256_file(model_path)
    if actual != meta["sha256"]:
        raise ArtifactError(
            f"model file {model_path} has sha256 {actual[:12]}..., metadata says "
            f"{meta['sha256'][:12]}...: refusing to load a modified artifact"
        )
    if expected_sha256 is not None and actual != expected_sha256:
        raise ArtifactError(
            f"model file {model_path} has sha256 {actual[:12]}..., the registry recorded "
            f"{expected_sha256[:12]}...: not the version that was registered"
        )
    try:
        model = joblib.load(model_path)
    except Exception as exc:  # noqa: BLE001 - corrupt, or pickled by other library versions
        raise ArtifactError(
            f"model file {model_path} could not be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(getattr(model, "predict_proba", None)):
        raise ArtifactError(f"model file {model_path} holds no classifier (no predict_proba)")
    return Artifact(directory, meta, model)


def check_against_registry(artifact: Artifact, store: Any) -> None:
    """The artifact's feature service must exist with exactly its ordered features."""
    try:
        service = store.get_feature_service(artifact.feature_service)
    except Exception as exc:  # noqa: BLE001 - Feast raises several not-found types
        raise ArtifactError(
            f"feature service {artifact.feature_service!r} of model {artifact.version} is not "
            f"in the registry: {exc}"
        ) from exc
    names = service_feature_names(service)
    if names != artifact.features:
        raise ArtifactError(
            f"model {artifact.version} expects features {artifact.features} but feature service "
            f"{artifact.feature_service!r} now serves {names}"
        )
