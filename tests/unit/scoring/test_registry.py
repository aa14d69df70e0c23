"""The MLflow model registry (scoring/registry.py) on SQLite, and the loader's fail-closed plan
over it: aliases, the sha256 tag, lineage and rollback, changes made through MLflow's own API,
and every state that must not serve.  Small scikit-learn models; no Redis, no Feast store."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from scoring.artifact import MODEL_FILE, ArtifactError, save_artifact
from scoring.config import ScoringSettings
from scoring.loader import resolve_plan
from scoring.registry import (
    MODEL_NAME,
    Registry,
    RegistryError,
    UnknownVersion,
    check_consistent,
)
from tests.fixtures.model_registry import fresh_registry

if TYPE_CHECKING:  # MLflow is imported by scoring.registry, after its telemetry default
    from mlflow import MlflowClient

MODEL = LogisticRegression().fit(np.arange(40.0).reshape(20, 2), [0, 1] * 10)


def artifact(model_dir: Path, version: str) -> Path:
    return save_artifact(model_dir / version, MODEL, {
        "version": version, "feature_service": "fraud_model_v1", "features": ["a", "b"],
        "metrics": {"with_velocity": {"roc_auc": 0.9, "pr_auc": 0.5}}})


def mlflow(reg: Registry) -> MlflowClient:
    """MLflow's own client (`mlflow.MlflowClient`) on the same registry: what an operator or
    the MLflow UI uses."""
    client = reg.client()
    assert type(client).__module__.startswith("mlflow.")
    return client


def plan(model_dir: Path, **kw: Any) -> Any:
    return resolve_plan(ScoringSettings(**{"model_dir": model_dir, "model_version": None, **kw}))


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """v1 (the champion) and v2 registered."""
    d = tmp_path / "models"
    reg = fresh_registry(d)
    for v in ("v1", "v2"):
        reg.register(artifact(d, v))
    return reg


def test_register_records_the_hash_and_the_first_version_serves(reg: Registry) -> None:
    state = reg.state()
    assert state["champion"] == "v1" and state["lineage"] == ["v1"]
    assert set(state["versions"]) == {"v1", "v2"}
    mv = mlflow(reg).get_model_version_by_alias(MODEL_NAME, "champion")
    assert mv.tags["artifact_version"] == "v1" and mv.tags["path"] == "v1"
    assert mv.tags["sha256"] == json.loads((reg.model_dir / "v1" / "metadata.json").read_text())[
        "sha256"]
    assert reg.register(reg.model_dir / "v1") == "v1"  # idempotent
    assert len(mlflow(reg).search_model_versions(f"name='{MODEL_NAME}'")) == 2
    p = plan(reg.model_dir)
    assert (p.champion.path, p.champion.sha256, p.source) == (
        reg.model_dir / "v1", mv.tags["sha256"], "registry")


def test_versions_are_immutable(reg: Registry) -> None:
    d = reg.model_dir / "other"
    save_artifact(d, LogisticRegression().fit(np.arange(40.0).reshape(20, 2), [1, 0] * 10),
                  {"version": "v1", "feature_service": "fraud_model_v1", "features": ["a", "b"]})
    with pytest.raises(RegistryError, match="already registered with another hash"):
        reg.register(d)
    assert len(reg.state()["versions"]) == 2


def test_promote_challenger_rollback(reg: Registry) -> None:
    assert reg.promote("v2") == "v1"
    reg.set_challenger("v1", "canary", 0.25)
    p = plan(reg.model_dir)
    assert (p.champion.path.name, p.challenger and p.challenger.path.name, p.mode, p.share) == (
        "v2", "v1", "canary", 0.25)
    assert reg.rollback() == "v1"  # rolling back to the challenger clears it
    state = reg.state()
    assert state["champion"] == "v1" and state["challenger"] is None
    assert "challenger" not in mlflow(reg).get_registered_model(MODEL_NAME).aliases
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback()
    with pytest.raises(UnknownVersion):
        reg.promote("v9")
    with pytest.raises(RegistryError, match="is the champion"):
        reg.set_challenger("v1", "shadow")
    with pytest.raises(RegistryError, match="already the champion"):
        reg.promote("v1")


def test_a_tampered_artifact_is_never_promoted(reg: Registry) -> None:
    with (reg.model_dir / "v2" / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        reg.promote("v2")
    with pytest.raises(ArtifactError, match="sha256"):
        reg.set_challenger("v2", "shadow")
    assert reg.state()["champion"] == "v1"


def test_changes_made_through_mlflow_take_effect(reg: Registry) -> None:
    """An alias set with MLflow's own API is what serves; a promotion made there joins the
    lineage, so a rollback made here returns to the champion it replaced."""
    reg.register(artifact(reg.model_dir, "v3"))
    client = mlflow(reg)
    number = {v: e["mlflow_version"] for v, e in reg.state()["versions"].items()}
    client.set_registered_model_alias(MODEL_NAME, "champion", str(number["v2"]))
    assert plan(reg.model_dir).champion.path.name == "v2"
    client.set_registered_model_alias(MODEL_NAME, "challenger", str(number["v3"]))
    p = plan(reg.model_dir)
    assert p.challenger is not None and p.challenger.path.name == "v3" and p.mode == "shadow"
    assert reg.promote("v3") == "v2"  # the challenger won: its alias is cleared
    assert reg.state()["lineage"] == ["v1", "v2", "v3"]
    assert reg.rollback() == "v2" and reg.rollback() == "v1"


def test_states_that_must_not_serve_are_refused(reg: Registry, tmp_path: Path) -> None:
    client = mlflow(reg)
    # a version registered through MLflow without the hash and path tags
    bare = client.create_model_version(MODEL_NAME, (reg.model_dir / "v2").as_uri())
    client.set_registered_model_alias(MODEL_NAME, "champion", str(bare.version))
    with pytest.raises(RegistryError, match="no recorded path and sha256"):
        check_consistent(reg.state())
    with pytest.raises(ArtifactError, match="no recorded path and sha256"):
        plan(reg.model_dir)
    # no champion at all
    client.delete_registered_model_alias(MODEL_NAME, "champion")
    with pytest.raises(ArtifactError, match="names no champion"):
        plan(reg.model_dir)
    # a pin of a version the registry does not know
    reg.promote("v2")
    with pytest.raises(ArtifactError, match="SERVING_MODEL_VERSION=v9 is not registered"):
        plan(reg.model_dir, model_version="v9")
    assert plan(reg.model_dir, model_version="v1").source == "pinned"
    # a challenger whose canary tag is broken
    client.set_registered_model_alias(MODEL_NAME, "challenger",
                                      str(reg.state()["versions"]["v1"]["mlflow_version"]))
    client.set_registered_model_tag(MODEL_NAME, "challenger", "{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        plan(reg.model_dir)


def test_a_missing_registry_is_not_created_by_readers(tmp_path: Path) -> None:
    d = tmp_path / "models"
    artifact(d, "v1")
    reg = Registry(d)
    assert not reg.exists() and reg.state()["versions"] == {}
    with pytest.raises(ArtifactError, match="does not exist"):
        plan(d)
    assert not (d / "mlflow.db").exists()
    assert plan(d, allow_unregistered_models=True).source == "newest"  # development flag


def test_an_unreachable_registry_is_refused_fast(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://postgres:secret@127.0.0.1:{port}/nowhere"
    with pytest.raises(ArtifactError, match="unreachable") as err:
        plan(tmp_path, model_registry_url=url)
    assert "secret" not in str(err.value)  # the password is never printed
    with pytest.raises(RegistryError, match="unreachable"):
        Registry(tmp_path, url).promote("v1")


def test_concurrent_registrations_lose_nothing(tmp_path: Path) -> None:
    d = tmp_path / "models"
    fresh_registry(d)
    dirs = [artifact(d, f"c{i}") for i in range(8)]
    errors: list[BaseException] = []

    def register(p: Path) -> None:
        try:
            Registry(d).register(p)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(p,)) for p in dirs + dirs[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    state = Registry(d).state()
    assert sorted(state["versions"]) == sorted(p.name for p in dirs)
    assert len(mlflow(Registry(d)).search_model_versions(f"name='{MODEL_NAME}'")) == len(dirs)
    assert state["lineage"] == [state["champion"]]  # exactly one first version became champion
