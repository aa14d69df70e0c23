"""The model pipeline (importable, so pickled artifacts reference this module, not __main__)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer


def _as_float(x: Any) -> Any:
    return np.asarray(x, dtype="float64")


def make_pipeline(seed: int) -> Pipeline:
    """Float coercion + gradient boosting, which routes missing values (NaN) natively."""
    return Pipeline(
        [
            ("to_float", FunctionTransformer(_as_float)),
            (
                "model",
                HistGradientBoostingClassifier(
                    max_iter=300, learning_rate=0.05, max_leaf_nodes=31,
                    l2_regularization=1.0, class_weight="balanced", random_state=seed,
                ),
            ),
        ]
    )
