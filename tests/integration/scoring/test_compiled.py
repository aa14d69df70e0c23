"""The compiled tree walker equals sklearn's predict_proba bit for bit, from one row to
thousands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from scoring.artifact import load_artifact
from scoring.compiled import _unwrap, _walk, compile_model


def probe_rows(model: HistGradientBoostingClassifier, n: int, seed: int) -> np.ndarray:
    """Rows whose values sit exactly on, just beside and far from the model's thresholds,
    with NaN and +-inf mixed in: every branch, every tie and the missing-value routing."""
    rng = np.random.default_rng(seed)
    per_feature: list[list[float]] = [[] for _ in range(model.n_features_in_)]
    for (predictor,) in model._predictors:
        for node in predictor.nodes:
            if not node["is_leaf"]:
                t = float(node["num_threshold"])
                per_feature[int(node["feature_idx"])] += [t, np.nextafter(t, np.inf),
                                                          np.nextafter(t, -np.inf)]
    x = np.empty((n, model.n_features_in_))
    for j, values in enumerate(per_feature):
        pool = np.array(values + [np.nan, np.inf, -np.inf, 0.0, 1e12, -1e12])
        x[:, j] = rng.choice(pool, n)
    return x


def assert_identical(model: object, fitted: HistGradientBoostingClassifier, n: int = 4000) -> None:
    predict = compile_model(model)
    assert predict is not None
    x = probe_rows(fitted, n, seed=1)
    expected = model.predict_proba(x)[:, 1]  # type: ignore[attr-defined]
    got = predict(x)
    assert np.array_equal(expected, got), f"max |diff| {np.abs(expected - got).max()}"
    one_by_one = np.concatenate([predict(x[i:i + 1]) for i in range(200)])
    assert np.array_equal(expected[:200], one_by_one)
    for rows in (x[:1], x[:100], np.array([list(r) for r in x[:37]], dtype="float64"),
                 np.asfortranarray(x[:50]), x[::3]):  # any layout: not only C-ordered rows
        assert np.array_equal(model.predict_proba(rows)[:, 1], predict(rows))  # type: ignore[attr-defined]
    readonly = x[:20].copy()
    readonly.flags.writeable = False
    assert np.array_equal(model.predict_proba(readonly)[:, 1], predict(readonly))  # type: ignore[attr-defined]
    assert predict(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="float64 rows"):
        predict(x[:, :-1])
    assert len(_walk.signatures) == 1  # compiled once, at load: never again on a request


def test_trained_artifact_is_bit_identical(trained_artifact: Path) -> None:
    artifact = load_artifact(trained_artifact)
    fitted = _unwrap(artifact.model)
    assert fitted is not None, "the training pipeline's model should take the fast path"
    assert_identical(artifact.model, fitted)


@pytest.mark.parametrize("missing_in_training", [True, False])
def test_synthetic_models_are_bit_identical(missing_in_training: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 6))
    x[:, 2] = np.round(x[:, 2] * 2)  # ties at thresholds
    if missing_in_training:  # splits learn where NaN goes, both directions occur
        x[rng.random(x.shape) < 0.25] = np.nan
    y = (np.nan_to_num(x[:, 0]) + 0.7 * np.nan_to_num(x[:, 2]) + rng.normal(size=5000) > 0.8)
    model = HistGradientBoostingClassifier(max_iter=60, max_leaf_nodes=31, random_state=0,
                                           early_stopping=False).fit(x, y.astype(int))
    assert_identical(Pipeline([("model", model)]), model)
    assert_identical(model, model)


def test_unsupported_models_are_not_compiled() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 3)), rng.integers(0, 2, 300)
    three = rng.integers(0, 3, 300)
    hgb = HistGradientBoostingClassifier(max_iter=5)
    assert compile_model(LogisticRegression().fit(x, y)) is None
    assert compile_model(HistGradientBoostingClassifier(max_iter=5)) is None  # not fitted
    assert compile_model(HistGradientBoostingClassifier(max_iter=5).fit(x, three)) is None
    assert compile_model(Pipeline([("s", StandardScaler()), ("m", hgb)]).fit(x, y)) is None
    cats = np.column_stack([rng.integers(0, 4, 300), x[:, 1]])
    categorical = HistGradientBoostingClassifier(max_iter=5, categorical_features=[0]).fit(cats, y)
    assert compile_model(categorical) is None
