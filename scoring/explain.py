"""Why a score is what it is: per-feature TreeSHAP contributions, the same online and offline.

The served model is a binary `HistGradientBoostingClassifier` (the one `scoring.compiled`
compiles).  It is not wrapped in a calibrator: its score is `expit(margin)`, where the margin
(log-odds) is the baseline plus the sum of its trees.  Contributions are therefore computed in
the **log-odds space**, where they add up exactly:

    base_value + sum(contributions) == margin == logit(score)      (to float rounding, ~1e-14)

`base_value` is the model's expected margin over its training data (each tree's leaves weighted
by the training rows that reached them).  A contribution > 0 pushes the score towards fraud.
Contributions are TreeSHAP's (`shap.TreeExplainer`, path-dependent: exact Shapley values of the
trees, using the node sample counts stored in the model, no background data), so a feature's
share does not depend on where in a tree it was split, unlike path (Saabas) attribution.

One function explains a float64 matrix of rows in the model's input order (`TreeShap.explain`):
the HTTP scorer calls it with the vectors it scored (`explain_results`, the row `Scorer.predict`
builds: `scoring.scorer.model_row`), the offline path with the point-in-time training frame
(`explain_frame`, used by `python -m training.explain`), so the same row gets the same numbers
in both places, bit for bit.

Cost: about 1 ms of CPU per row for a 200-tree ensemble (the C routine holds the GIL; large
batches run in a worker thread in chunks, so the event loop gets it back between chunks); the
explainer is built once per model version, the first time it is asked for.  Any other model
(or one with categorical splits) has no explainer: `explainer_for` returns None.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import shap

from scoring.artifact import Artifact
from scoring.compiled import supported_hgb
from scoring.models import ModelSet
from scoring.scorer import OFFLOAD, Scorer, ScoreResult, model_row

METHOD = "tree_shap"
UNITS = "log_odds"
TOP_REASONS = 5  # reasons returned per score
# Rows per call of shap's C routine, which holds the GIL: about 8 ms for a 200-tree model.
CHUNK_ROWS = 8
# Up to this many rows are explained on the event loop (about 1 ms each); more go to a thread.
INLINE_ROWS = 4

Direction = Literal["raises", "lowers"]


@dataclass(frozen=True)
class Reason:
    """One input and how far it moved the score's log-odds away from the base value."""

    feature: str
    value: float | None  # the model's input (None: missing)
    contribution: float  # log-odds

    @property
    def direction(self) -> Direction:
        return "raises" if self.contribution > 0 else "lowers"


@dataclass(frozen=True)
class Explanation:
    """Contributions of every input to one row's margin (log-odds)."""

    base_value: float
    contributions: dict[str, float]  # every input, in the model's order
    values: dict[str, float | None]  # the row explained (None: missing)

    @property
    def margin(self) -> float:
        """base_value + the contributions: the model's log-odds for the row."""
        return self.base_value + math.fsum(self.contributions.values())

    def reasons(self, top: int = TOP_REASONS) -> list[Reason]:
        """The `top` inputs with the largest |contribution|, largest first (ties by input
        order); inputs that moved nothing (contribution 0) are never reasons."""
        ranked = sorted((kv for kv in self.contributions.items() if kv[1] != 0.0),
                        key=lambda kv: -abs(kv[1]))
        return [Reason(name, self.values[name], c) for name, c in ranked[:top]]


class TreeShap:
    """TreeSHAP of one fitted model, in log-odds."""

    def __init__(self, model: Any, features: Sequence[str]):
        hgb = supported_hgb(model)
        if hgb is None:
            raise ValueError(f"{type(model).__name__} is not an explainable tree ensemble")
        if hgb.n_features_in_ != len(features):
            raise ValueError(f"the model has {hgb.n_features_in_} inputs, {len(features)} "
                             "feature names were given")
        self.features = list(features)
        self._shap = shap.TreeExplainer(hgb, model_output="raw")
        self.base_value = float(np.ravel(self._shap.expected_value)[0])

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """(rows, inputs) contributions of a float64 matrix in the model's input order (NaN:
        missing), computed `CHUNK_ROWS` rows per call; a row's numbers do not depend on the
        rows beside it."""
        x = np.asarray(x, dtype="float64")
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ValueError(f"expected rows of {len(self.features)} inputs, got shape {x.shape}")
        out = np.empty_like(x)
        for i in range(0, len(x), CHUNK_ROWS):
            # additivity is tested (tests/unit/scoring/test_explain.py), not re-checked per call
            out[i:i + CHUNK_ROWS] = self._shap.shap_values(x[i:i + CHUNK_ROWS],
                                                           check_additivity=False)
        return out

    def explain(self, x: np.ndarray) -> list[Explanation]:
        """One Explanation per row of `x`."""
        x = np.asarray(x, dtype="float64")
        phi = self.contributions(x)
        return [
            Explanation(self.base_value,
                        dict(zip(self.features, map(float, c), strict=True)),
                        {f: None if math.isnan(v) else float(v)
                         for f, v in zip(self.features, row, strict=True)})
            for row, c in zip(x, phi, strict=True)
        ]


# one explainer per loaded model, dropped with it (a reload loads new model objects)
_EXPLAINERS: weakref.WeakKeyDictionary[Any, TreeShap | None] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def explainer_for(artifact: Artifact) -> TreeShap | None:
    """The artifact's explainer (built on first use, then cached), or None for a model that
    has none."""
    with _LOCK:
        try:
            return _EXPLAINERS[artifact.model]
        except KeyError:
            pass
        try:
            explainer: TreeShap | None = TreeShap(artifact.model, artifact.features)
        except ValueError:
            explainer = None
        _EXPLAINERS[artifact.model] = explainer
        return explainer


def is_built(artifact: Artifact) -> bool:
    """Whether `explainer_for(artifact)` would answer at once (built, or known to be None)."""
    return artifact.model in _EXPLAINERS


def explain_frame(artifact: Artifact, frame: pd.DataFrame) -> pd.DataFrame:
    """Offline: the contributions of every row of a frame holding the model's inputs (e.g. the
    point-in-time training frame), one column per input, plus `base_value` and `margin`;
    same index as `frame`.  Raises ValueError for a model without an explainer."""
    explainer = explainer_for(artifact)
    if explainer is None:
        raise ValueError(f"model {artifact.version} has no explainer (not a supported tree "
                         "ensemble)")
    missing = [f for f in artifact.features if f not in frame.columns]
    if missing:
        raise ValueError(f"the frame lacks model inputs {missing}")
    x = frame[artifact.features].to_numpy("float64")  # the matrix training fits and scores
    out = pd.DataFrame(explainer.contributions(x), index=frame.index, columns=artifact.features)
    out["base_value"] = explainer.base_value
    out["margin"] = explainer.base_value + out[artifact.features].sum(axis=1)
    return out


def _scorer_of(models: ModelSet, version: str) -> Scorer:
    for scorer in _scorers(models):
        if scorer.artifact.version == version:
            return scorer
    raise ValueError(f"model {version} is not in the model set that scored")


def explain_scored(models: ModelSet, results: Sequence[ScoreResult]) -> list[Explanation | None]:
    """Online: the explanation of each result by the model that produced it (champion or
    canary challenger), on the vector it scored; None where that model has no explainer."""
    out: list[Explanation | None] = [None] * len(results)
    by_version: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        by_version.setdefault(r.model_version, []).append(i)
    for version, idx in by_version.items():
        artifact = _scorer_of(models, version).artifact
        explainer = explainer_for(artifact)
        if explainer is None:
            continue
        x = np.array([model_row(results[i].vector, artifact.features) for i in idx],
                     dtype="float64")
        for i, e in zip(idx, explainer.explain(x), strict=True):
            out[i] = e
    return out


async def explain_results(models: ModelSet, results: Sequence[ScoreResult]
                          ) -> list[Explanation | None]:
    """`explain_scored` without holding the event loop: on it for up to `INLINE_ROWS` rows of
    models whose explainer is built, otherwise in a worker thread."""
    built = all(is_built(s.artifact) for s in _scorers(models))
    if len(results) <= INLINE_ROWS and built:
        return explain_scored(models, results)
    return await OFFLOAD(explain_scored, models, results)


def _scorers(models: ModelSet) -> list[Scorer]:
    ch = models.challenger
    return [models.champion] + ([ch.scorer] if ch is not None else [])
