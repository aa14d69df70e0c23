"""The scorer's tree walker: a fitted gradient-boosted tree ensemble scored in one compiled loop.

scikit-learn's `predict_proba` spends ~0.3-1 ms of fixed cost per call (input validation,
thread set-up, one Cython call per tree) however small the batch; an online request scores one
row.  For `HistGradientBoostingClassifier` (binary, numeric features), `compile_model` returns
a predictor that walks every tree for every row in one numba-compiled loop (`_walk`, compiled
once per process when a model loads; it releases the GIL, so a large batch's walk in a
worker thread leaves the event loop running).  Its cost against `predict_proba` and against
its predecessor (the trees compiled to Python source) is in docs/benchmarks.md.

It is bit-identical to `predict_proba(x)[:, 1]`: the fitted trees' own node records, the same
missing-value routing and comparisons, the same float64 sum in the same order (the baseline,
then tree by tree), and the binary log loss's own link (`expit`).
`tests/integration/scoring/test_compiled.py` checks that on real models, NaNs and values on
every threshold included.  Any other model (or one with categorical splits) gets `None` and is
scored through its own `predict_proba`: the fast path is an optimisation, never a requirement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline

Predictor = Callable[[np.ndarray], np.ndarray]
log = logging.getLogger(__name__)


def compile_model(model: Any) -> Predictor | None:
    """`f(x) -> predict_proba(x)[:, 1]` for a float64 array `x` of shape (rows, inputs), for a
    supported model (`supported_hgb`; else None), without the input validation, which the
    scorer's rows need not (finite or NaN floats, in the model's input order).

    The raw predictions are sklearn's `_raw_predict` (zeros plus the baseline, then each
    tree's value added in order), walked by `_walk`: every tree of the ensemble for every
    row in one compiled loop, where sklearn makes one Cython call per tree.  The nodes are the
    fitted trees' own values; the walk is the one of sklearn's `_predict_one_from_raw_data`
    for numeric splits (NaN goes where `missing_go_to_left` says, else `x <= threshold` goes
    left).  The probabilities are those of the binary log loss's `predict_proba`: `expit` of
    the raw values (its link's inverse); a model with another loss gets None."""
    hgb = _unwrap(model)
    if hgb is None or getattr(hgb, "_preprocessor", None) is not None:
        return None
    baseline, loss, width = hgb._baseline_prediction, hgb._loss, hgb.n_features_in_
    if (baseline.shape != (1, 1) or baseline.dtype != np.float64
            or type(loss).__name__ != "HalfBinomialLoss"):
        return None
    trees = [predictor.nodes for (predictor,) in hgb._predictors]
    roots = np.cumsum([0] + [len(t) for t in trees[:-1]]).astype(np.int64)
    nodes = np.concatenate(trees)  # a copy: the model's own trees are left as they are
    if len(nodes) >= np.iinfo(nodes["left"].dtype).max:
        return None  # children indices past their field's range
    offset = np.repeat(roots, [len(t) for t in trees])  # children index within their tree
    # the fitted trees' own node records, in one array, children indexed within it: one
    # array to pass, so a call of one row costs little more than its walk
    nodes["left"] += offset.astype(nodes["left"].dtype)
    nodes["right"] += offset.astype(nodes["right"].dtype)

    def predict(x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float64 or x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"expected float64 rows of {width} inputs, got {x.dtype} {x.shape}")
        raw = np.zeros(x.shape[0], dtype=np.float64)
        raw += baseline[0]
        # C-ordered and writable: the one array type `_walk` was compiled for
        _walk(np.require(x, requirements=["C", "W"]), roots, nodes, raw)
        # the binary log loss's predict_proba(raw)[:, 1] is its link's inverse, expit
        proba: np.ndarray = expit(raw)
        return proba

    try:
        predict(np.zeros((1, width)))  # compiles `_walk` now (once per process), not on a request
    except numba.core.errors.NumbaError:  # e.g. node records of another sklearn: no fast path
        log.warning("the tree walker does not compile for this model; scoring with "
                    "predict_proba", exc_info=True)
        return None
    return predict


def supported_hgb(model: Any) -> Any | None:
    """The fitted binary HistGradientBoostingClassifier that `model` is (or a one-step Pipeline
    of) when this module compiles it, else None; `scoring.explain` explains the same models."""
    return _unwrap(model)


def _unwrap(model: Any) -> Any | None:
    """The HistGradientBoostingClassifier this model is (or a one-step Pipeline of), if it
    qualifies: fitted, binary, one tree per iteration, no categorical splits."""
    if isinstance(model, Pipeline):
        if len(model.steps) != 1:
            return None
        model = model.steps[0][1]
    if type(model) is not HistGradientBoostingClassifier:  # a subclass may predict differently
        return None
    if not hasattr(model, "_predictors") or getattr(model, "n_trees_per_iteration_", 0) != 1:
        return None
    if getattr(model, "is_categorical_", None) is not None and bool(model.is_categorical_.any()):
        return None
    if len(getattr(model, "classes_", ())) != 2:
        return None
    return model


@numba.njit(nogil=True)
def _walk(x: np.ndarray, roots: np.ndarray, nodes: np.ndarray,
          raw: np.ndarray) -> None:  # pragma: no cover - compiled
    """raw[i] += each tree's leaf value for row i, tree after tree (float64, in order)."""
    for t in range(roots.shape[0]):  # tree by tree: one tree's nodes stay in cache
        root = roots[t]
        for i in range(x.shape[0]):
            node = nodes[root]
            while not node.is_leaf:
                v = x[i, node.feature_idx]
                if np.isnan(v):
                    node = nodes[node.left] if node.missing_go_to_left else nodes[node.right]
                elif v <= node.num_threshold:
                    node = nodes[node.left]
                else:
                    node = nodes[node.right]
            raw[i] += node.value
