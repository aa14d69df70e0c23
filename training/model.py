"""The model pipeline (importable, so pickled artifacts reference this module, not __main__)."""

from __future__ import annotations

from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline


def make_pipeline(seed: int) -> Pipeline:
    """Gradient-boosted trees on float inputs in the feature service's order.

    Missing values (NaN) are part of the model: each split learns which side missing values
    go to, so training and serving impute identically with no separate imputer to keep in sync.
    Early stopping keeps the ensemble small, which keeps single-row latency low.
    """
    return Pipeline(
        [
            (
                "model",
                HistGradientBoostingClassifier(
                    max_iter=200, learning_rate=0.1, max_leaf_nodes=31,
                    l2_regularization=1.0, class_weight="balanced", random_state=seed,
                    early_stopping=True, validation_fraction=0.1, n_iter_no_change=20,
                ),
            ),
        ]
    )
