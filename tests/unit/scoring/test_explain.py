"""scoring.explain: TreeSHAP contributions add up to the model's log-odds, do not depend on the
rows beside them, and rank the reasons the model actually used."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from scoring.artifact import Artifact
from scoring.explain import CHUNK_ROWS, TreeShap, explain_frame, explainer_for

FEATURES = ["amount_ratio", "txn_count_1h", "noise_a", "noise_b", "hour"]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Fraud driven by the first two inputs (the rest is noise), a quarter of values missing."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, len(FEATURES)))
    x[:, 4] = np.round(rng.uniform(0, 24, 3000))  # ties at thresholds
    y = (2.0 * x[:, 0] + 1.0 * x[:, 1] + 0.3 * rng.normal(size=3000) > 2.5).astype(int)
    x[rng.random(x.shape) < 0.25] = np.nan  # splits learn where missing values go
    return x, y


@pytest.fixture(scope="module")
def model(data: tuple[np.ndarray, np.ndarray]) -> Pipeline:
    x, y = data
    hgb = HistGradientBoostingClassifier(max_iter=40, max_leaf_nodes=31, random_state=0,
                                         early_stopping=False)
    with threadpool_limits(1):  # OpenMP threads only spin on a busy 2-core machine
        return Pipeline([("model", hgb)]).fit(x, y)


def artifact(model: Any) -> Artifact:
    return Artifact(Path("/nonexistent"), {"version": "v-test", "feature_service": "fs",
                                           "features": FEATURES}, model)


def test_contributions_add_up_to_the_model_margin(model: Pipeline,
                                                  data: tuple[np.ndarray, np.ndarray]) -> None:
    x = data[0][:500]
    explainer = TreeShap(model, FEATURES)
    phi = explainer.contributions(x)
    margin = model.decision_function(x)
    assert np.isnan(x).any(axis=1).mean() > 0.5  # most rows have a missing input
    np.testing.assert_allclose(explainer.base_value + phi.sum(axis=1), margin, rtol=0, atol=1e-9)
    # ... and through the logistic link, to the served probability
    np.testing.assert_allclose(expit(explainer.base_value + phi.sum(axis=1)),
                               model.predict_proba(x)[:, 1], rtol=0, atol=1e-12)
    for e, m in zip(explainer.explain(x[:50]), margin[:50], strict=True):
        assert e.margin == pytest.approx(m, abs=1e-9)


def test_base_value_is_the_expected_margin_over_the_training_data(
        model: Pipeline, data: tuple[np.ndarray, np.ndarray]) -> None:
    """Path-dependent TreeSHAP's base value: each tree's leaves weighted by the training rows
    that reached them (the trees were grown on a subsample of the binned data, so the mean
    over the full training set is close, not equal)."""
    explainer = TreeShap(model, FEATURES)
    assert explainer.base_value == pytest.approx(model.decision_function(data[0]).mean(), abs=0.3)


def test_a_row_gets_the_same_numbers_alone_and_in_any_batch(model: Pipeline,
                                                            data: tuple[np.ndarray, np.ndarray]
                                                            ) -> None:
    x = data[0][: 3 * CHUNK_ROWS + 5]
    explainer = TreeShap(model, FEATURES)
    batch = explainer.contributions(x)
    single = np.vstack([explainer.contributions(row[None, :]) for row in x])
    reversed_ = explainer.contributions(x[::-1])[::-1]
    assert np.array_equal(batch, single)
    assert np.array_equal(batch, reversed_)


def test_offline_frame_equals_the_online_rows(model: Pipeline,
                                              data: tuple[np.ndarray, np.ndarray]) -> None:
    x = data[0][:40]
    frame = pd.DataFrame(x, columns=FEATURES, index=[f"t{i}" for i in range(40)])
    frame["is_fraud"] = 0  # other columns are ignored
    out = explain_frame(artifact(model), frame[["is_fraud", *reversed(FEATURES)]])
    assert list(out.index) == list(frame.index)
    explained = TreeShap(model, FEATURES).explain(x)
    for (_, row), e in zip(out.iterrows(), explained, strict=True):
        assert [row[f] for f in FEATURES] == list(e.contributions.values())
        assert row["base_value"] == e.base_value
        assert row["margin"] == pytest.approx(e.margin, abs=1e-12)


def test_reasons_rank_the_inputs_the_model_uses(model: Pipeline) -> None:
    risky = np.array([[3.0, 2.0, 0.1, -0.1, 3.0]])  # both drivers high: fraud
    (e,) = TreeShap(model, FEATURES).explain(risky)
    reasons = e.reasons()
    assert model.predict_proba(risky)[0, 1] > 0.9
    assert [r.feature for r in reasons[:2]] == ["amount_ratio", "txn_count_1h"]
    assert all(r.direction == "raises" for r in reasons[:2])
    sizes = [abs(r.contribution) for r in reasons]
    assert sizes == sorted(sizes, reverse=True)
    assert all(r.contribution != 0 for r in reasons)
    assert all((r.direction == "raises") == (r.contribution > 0) for r in reasons)
    assert reasons[0].value == 3.0
    assert len(e.reasons(top=1)) == 1

    safe = np.array([[-2.0, -1.0, 0.0, 0.0, 12.0]])
    (e,) = TreeShap(model, FEATURES).explain(safe)
    top = e.reasons()[0]
    assert top.feature == "amount_ratio" and top.direction == "lowers"


def test_missing_inputs_are_reported_as_none(model: Pipeline) -> None:
    row = np.array([[np.nan, 1.0, np.nan, 0.0, 4.0]])
    (e,) = TreeShap(model, FEATURES).explain(row)
    assert e.values["amount_ratio"] is None and e.values["txn_count_1h"] == 1.0
    assert all(math.isfinite(c) for c in e.contributions.values())


def test_models_without_an_explainer(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = np.nan_to_num(data[0][:500]), data[1][:500]
    linear = LogisticRegression().fit(x, y)
    assert explainer_for(artifact(linear)) is None
    with pytest.raises(ValueError, match="no explainer"):
        explain_frame(artifact(linear), pd.DataFrame(x, columns=FEATURES))


def test_bad_input_is_refused_with_a_clear_error(model: Pipeline) -> None:
    with pytest.raises(ValueError, match="5 inputs, 2 feature names"):
        TreeShap(model, FEATURES[:2])
    with pytest.raises(ValueError, match="rows of 5 inputs"):
        TreeShap(model, FEATURES).contributions(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"lacks model inputs \['hour'\]"):
        explain_frame(artifact(model), pd.DataFrame(np.zeros((2, 4)), columns=FEATURES[:4]))


def test_the_explainer_is_built_once_per_model(model: Pipeline) -> None:
    a = artifact(model)
    first = explainer_for(a)
    assert first is not None and explainer_for(artifact(model)) is first
