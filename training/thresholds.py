"""Decision thresholds chosen for an alert budget, and what they do hour by hour.

A score becomes a decision with two thresholds (`scoring.scorer.Thresholds`): decline at or
above `decline`, review at or above `review`, approve below.  `choose_thresholds` picks them on
a validation period for a stated budget:

* decline: the lowest threshold at which the declined transactions are at least
  `min_decline_precision` fraud (and at least `min_declines` of them, so the precision is
  measured, not a fluke of one or two rows); none reaches it: 1.0, nothing is declined
  automatically;
* review: the lowest threshold at which the transactions sent to review (between the two
  thresholds) are at most `max_review_rate` of all transactions, what the analysts can handle.

`decision_rows` reports review and decline rates and precision per group (hour of day UTC, hour
in the card holder's time zone ...), so a night-time review storm shows before a model ships.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class AlertBudget:
    max_review_rate: float = 0.01  # share of all transactions sent to manual review
    min_decline_precision: float = 0.9  # share of automatic declines that are fraud
    min_declines: int = 5  # fewer validation declines than this measure no precision

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flagged_at(score: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores descending, and for each: rows scoring at or above it, frauds among them."""
    order = np.argsort(-score, kind="stable")
    s, f = score[order], y[order].astype(np.int64)
    last_of_value = np.r_[s[1:] != s[:-1], True]  # ties are flagged together
    return s[last_of_value], np.flatnonzero(last_of_value) + 1, np.cumsum(f)[last_of_value]


def choose_thresholds(y: np.ndarray, score: np.ndarray, budget: AlertBudget) -> dict[str, float]:
    """{"review": r, "decline": d} with r <= d, chosen on (y, score) for `budget`."""
    values, flagged, frauds = _flagged_at(np.asarray(score, dtype=np.float64), np.asarray(y))
    precise = (flagged >= budget.min_declines) & (
        frauds >= budget.min_decline_precision * flagged)
    decline = float(values[np.flatnonzero(precise)[-1]]) if precise.any() else 1.0
    declined = int((score >= decline).sum())
    # rows in [r, decline) for each candidate r below the decline threshold
    reviewed = flagged - declined
    ok = (values < decline) & (reviewed <= budget.max_review_rate * len(score))
    review = float(values[np.flatnonzero(ok)[-1]]) if ok.any() else decline
    return {"review": min(review, decline), "decline": decline}


def decisions(score: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """0 approve, 1 review, 2 decline (the scorer's rule)."""
    return np.where(score >= thresholds["decline"], 2, np.where(score >= thresholds["review"], 1, 0))


def _summary(y: np.ndarray, d: np.ndarray) -> dict[str, Any]:
    """Counts, rates and precisions (None where there is nothing to measure: valid JSON)."""
    n, fraud = len(y), int(y.sum())
    rev, dec = d == 1, d == 2

    def rate(mask: np.ndarray) -> float | None:
        return float(mask.sum() / n) if n else None

    def precision(mask: np.ndarray) -> float | None:
        return float(y[mask].mean()) if mask.any() else None

    return {
        "rows": n, "frauds": fraud,
        "review_rate": rate(rev), "review_precision": precision(rev),
        "decline_rate": rate(dec), "decline_precision": precision(dec),
        "alert_precision": precision(rev | dec),  # of everything not approved
        "fraud_caught": float(y[rev | dec].sum() / fraud) if fraud else None,
    }


def decision_rows(y: np.ndarray, score: np.ndarray, thresholds: dict[str, float],
                  groups: np.ndarray | None = None) -> dict[Any, dict[str, Any]]:
    """Decision rates and precision overall (`groups` None: key "all") or per group value
    (rows whose group is missing are left out); JSON-ready values."""
    y = np.asarray(y).astype(np.int64)
    d = decisions(np.asarray(score, dtype=np.float64), thresholds)
    if groups is None:
        return {"all": _summary(y, d)}
    g = np.asarray(groups)
    keys = pd.unique(g[~pd.isna(g)])
    return {k: _summary(y[g == k], d[g == k]) for k in sorted(keys)}


def decision_table(y: np.ndarray, score: np.ndarray, thresholds: dict[str, float],
                   groups: np.ndarray | None = None) -> pd.DataFrame:
    """`decision_rows` as a table, one row per group."""
    return pd.DataFrame.from_dict(decision_rows(y, score, thresholds, groups), orient="index")


def calibration(y: np.ndarray, score: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Brier score, mean score vs fraud rate, and per score-quantile bin (reliability)."""
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    edges = np.unique(np.quantile(score, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, max(len(edges) - 2, 0))
    table = [{"rows": int(m.sum()), "mean_score": float(score[m].mean()),
              "fraud_rate": float(y[m].mean())}
             for m in (idx == b for b in range(max(len(edges) - 1, 1))) if m.any()]
    ece = sum(r["rows"] * abs(r["mean_score"] - r["fraud_rate"]) for r in table) / len(y)
    return {"brier": float(np.mean((score - y) ** 2)), "mean_score": float(score.mean()),
            "fraud_rate": float(y.mean()), "expected_calibration_error": float(ece),
            "bins": table}
