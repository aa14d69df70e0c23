"""The training job's artifact (verified before use, tied to the feature registry) and the
simulator it learns from (deterministic, realistic class balance, labels after the facts)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from feature_repo.paths import labels_path, transactions_dir
from scoring.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    ArtifactError,
    check_against_registry,
    load_artifact,
    service_feature_names,
)
from tests.conftest import run_module
from training.retrieval import labelled_entity_frame, read_transactions, training_frame
from training.simulate import SimConfig, simulate


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / artifact.name
    shutil.copytree(artifact, dst)
    return dst


def _rewrite_metadata(directory: Path, **changes: Any) -> None:
    path = directory / METADATA_FILE
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


# --- the artifact -----------------------------------------------------------------------


@pytest.mark.integration
def test_artifact_loads_and_scores_training_rows(
    trained_artifact: Path, materialized_store: Any
) -> None:
    art = load_artifact(trained_artifact)
    assert art.path == trained_artifact
    assert art.version == trained_artifact.name
    entities = labelled_entity_frame().sample(300, random_state=0)
    frame = training_frame(materialized_store, art.feature_service, entities)
    # the model takes float64 rows in the metadata's feature order (as training fit it)
    proba = art.model.predict_proba(frame[art.features].to_numpy("float64"))
    assert proba.shape == (300, 2)
    assert np.all((proba >= 0) & (proba <= 1))
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert len(np.unique(proba[:, 1].round(6))) > 10  # not a constant model
    # missing features (an unknown user) are imputed inside the pipeline, not an error
    empty = np.full((1, len(art.features)), np.nan)
    assert 0 <= art.model.predict_proba(empty)[0, 1] <= 1


@pytest.mark.integration
def test_metadata_features_are_the_feature_service_in_order(
    trained_artifact: Path, store: Any
) -> None:
    art = load_artifact(trained_artifact)
    assert art.feature_service == "fraud_model_v1"
    service = store.get_feature_service(art.feature_service)
    assert art.features == service_feature_names(service)
    assert len(art.features) == len(set(art.features)) > 10
    assert "user_txn_count_10m" in art.features and "txn_amount_log" in art.features


@pytest.mark.integration
def test_metadata_sha256_is_the_model_file_hash(trained_artifact: Path) -> None:
    meta = json.loads((trained_artifact / METADATA_FILE).read_text())
    digest = hashlib.sha256((trained_artifact / MODEL_FILE).read_bytes()).hexdigest()
    assert meta["sha256"] == digest
    assert meta["model_file"] == MODEL_FILE


@pytest.mark.integration
def test_metrics_with_and_without_velocity(trained_artifact: Path) -> None:
    meta = json.loads((trained_artifact / METADATA_FILE).read_text())
    window = meta["training_window"]
    assert set(meta["metrics"]) == {"with_velocity", "without_velocity"}
    for m in meta["metrics"].values():
        for k in ("roc_auc", "pr_auc", "recall_at_fpr_0.01", "threshold_at_fpr"):
            assert 0.0 <= m[k] <= 1.0, k
        assert m["rows"] == window["test_rows"]
        assert 0 < m["positives"] < m["rows"]
    # a model that learned something: well above chance on the held-out period
    assert meta["metrics"]["with_velocity"]["roc_auc"] > 0.7
    assert meta["thresholds"]["decline"] >= meta["thresholds"]["review"]
    assert window["start"] < window["split"] < window["end"]


@pytest.mark.integration
def test_training_used_every_labelled_transaction(
    trained_artifact: Path, feature_data: Path
) -> None:
    meta = json.loads((trained_artifact / METADATA_FILE).read_text())
    window = meta["training_window"]
    labels = pd.read_parquet(labels_path(feature_data))
    assert window["train_rows"] + window["test_rows"] == len(labels)
    tx = read_transactions(feature_data)
    assert pd.Timestamp(window["start"]) == tx["event_timestamp"].min()
    assert pd.Timestamp(window["end"]) == tx["event_timestamp"].max()
    assert (trained_artifact / "roc_pr.png").stat().st_size > 0


@pytest.mark.integration
def test_modified_model_file_is_refused(trained_artifact: Path, tmp_path: Path) -> None:
    copy = _copy(trained_artifact, tmp_path)
    load_artifact(copy)  # an unmodified copy loads
    with (copy / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="refusing to load a modified artifact"):
        load_artifact(copy)


@pytest.mark.integration
def test_incomplete_artifacts_are_refused(trained_artifact: Path, tmp_path: Path) -> None:
    copy = _copy(trained_artifact, tmp_path)
    (copy / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(copy)
    copy = _copy(trained_artifact, tmp_path / "b")
    meta = json.loads((copy / METADATA_FILE).read_text())
    del meta["sha256"]
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(copy)
    (copy / METADATA_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(copy)
    with pytest.raises(ArtifactError, match="no model metadata"):
        load_artifact(tmp_path / "nowhere")


@pytest.mark.integration
def test_artifact_matches_the_registry(trained_artifact: Path, store: Any) -> None:
    check_against_registry(load_artifact(trained_artifact), store)


@pytest.mark.integration
def test_artifact_with_reordered_features_is_refused(
    trained_artifact: Path, store: Any, tmp_path: Path
) -> None:
    copy = _copy(trained_artifact, tmp_path)
    features = json.loads((copy / METADATA_FILE).read_text())["features"]
    features[0], features[1] = features[1], features[0]
    _rewrite_metadata(copy, features=features)
    art = load_artifact(copy)  # the model file is intact ...
    with pytest.raises(ArtifactError, match="expects features"):
        check_against_registry(art, store)  # ... but would be fed the wrong columns


@pytest.mark.integration
def test_artifact_of_an_unknown_feature_service_is_refused(
    trained_artifact: Path, store: Any, tmp_path: Path
) -> None:
    copy = _copy(trained_artifact, tmp_path)
    _rewrite_metadata(copy, feature_service="fraud_model_v0")
    with pytest.raises(ArtifactError, match="not in the registry"):
        check_against_registry(load_artifact(copy), store)


@pytest.mark.integration
def test_ablation_artifact_metadata_is_refused_against_the_full_service(
    trained_artifact: Path, store: Any, tmp_path: Path
) -> None:
    copy = _copy(trained_artifact, tmp_path)
    ablation = service_feature_names(store.get_feature_service("fraud_model_v1_no_velocity"))
    _rewrite_metadata(copy, features=ablation)
    with pytest.raises(ArtifactError):
        check_against_registry(load_artifact(copy), store)
    _rewrite_metadata(copy, feature_service="fraud_model_v1_no_velocity")
    check_against_registry(load_artifact(copy), store)


# --- the simulator ------------------------------------------------------------------------

SIM = ["--users", "1000", "--days", "40", "--seed", "7", "--end", "2026-06-01"]


@pytest.fixture(scope="module")
def simulated_twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("sim-a"), tmp_path_factory.mktemp("sim-b")
    run_module("training.simulate", *SIM, "--out", str(a))
    run_module("training.simulate", *SIM, "--out", str(b))
    return a, b


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_simulator_same_arguments_same_bytes(simulated_twice: tuple[Path, Path]) -> None:
    a, b = (_files(r) for r in simulated_twice)
    assert len(a) == 42  # 40 daily partitions + labels + customer records
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def test_simulator_seed_changes_the_data() -> None:
    cfg = SimConfig(users=200, days=10, seed=7)
    tx1, _ = simulate(cfg)
    tx2, _ = simulate(SimConfig(users=200, days=10, seed=8))
    assert not tx1.equals(tx2)
    again, _ = simulate(cfg)
    pd.testing.assert_frame_equal(tx1, again)


def test_simulated_class_balance_and_label_times(simulated_twice: tuple[Path, Path]) -> None:
    root = simulated_twice[0]
    tx = read_transactions(root)
    labels = pd.read_parquet(labels_path(root))
    assert tx["transaction_id"].is_unique
    assert len(labels) == len(tx) > 40_000
    assert set(labels["transaction_id"]) == set(tx["transaction_id"])
    rate = labels["is_fraud"].mean()
    assert 0.005 <= rate <= 0.02, rate
    both = tx.merge(labels, on="transaction_id")
    delay = both["label_timestamp"] - both["event_timestamp"]
    assert (delay > pd.Timedelta(0)).all()  # a label is never known before the transaction
    fraud = both["is_fraud"] == 1
    assert (delay[~fraud] == pd.Timedelta(days=3)).all()
    assert delay[fraud].min() >= pd.Timedelta(hours=1)
    assert delay[fraud].max() < pd.Timedelta(days=10)
    # the log is in time order, each day's partition holds only that day
    assert tx["event_timestamp"].is_monotonic_increasing
    assert tx["event_timestamp"].min() >= pd.Timestamp("2026-04-22", tz="UTC")
    assert tx["event_timestamp"].max() < pd.Timestamp("2026-06-01", tz="UTC")
    for part in sorted(transactions_dir(root).iterdir()):
        days = pd.read_parquet(part)["event_timestamp"].dt.strftime("%Y-%m-%d")
        assert set(days) == {part.name.removeprefix("date=")}
