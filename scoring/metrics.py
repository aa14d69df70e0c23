"""Prometheus metrics of the scoring core, exported by every runtime that scores (the HTTP
and the stream scorer): lookups, model latency, scores, decisions, missing inputs, drift,
challengers and the prediction log.

Every gauge says how worker processes combine (`multiprocess_mode`, used only in
prometheus_client's multiprocess mode, `python -m serving --workers N`; serving/metrics.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

# seconds; 0.25 and 0.75 so that quantiles between 0.1 s and 1 s (a slow Redis, the 0.5 s
# lookup deadline) are not interpolated across one wide bucket
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 0.75, 1)

LOOKUP_LATENCY = Histogram(
    "fraud_online_lookup_seconds", "Online feature lookup latency", buckets=LATENCY_BUCKETS
)
MODEL_LATENCY = Histogram(
    "fraud_model_latency_seconds", "Model inference latency", buckets=LATENCY_BUCKETS
)
SCORE = Histogram("fraud_score", "Model scores", buckets=tuple(i / 20 for i in range(1, 21)))
DECISIONS = Counter("fraud_decisions_total", "Decisions", ["decision"])
MISSING = Counter(
    "fraud_missing_features_total", "Model inputs missing at scoring time", ["feature", "reason"]
)
# each worker measures its own share of the traffic; across workers: the worst (live ones only)
FEATURE_PSI = Gauge("fraud_feature_psi", "Population stability index vs training", ["feature"],
                    multiprocess_mode="livemax")

# --- challengers -----------------------------------------------------------------------------
SHADOW_SCORES = Counter(
    "fraud_shadow_scores_total", "Transactions scored by the shadow model (never returned)",
    ["version"],
)
SHADOW_ERRORS = Counter(
    "fraud_shadow_errors_total", "Shadow scorings that failed (the champion still answered)",
    ["version"],
)
CANARY_REQUESTS = Counter(
    "fraud_canary_requests_total", "Transactions answered by the canary model", ["version"]
)
CHALLENGER_SCORE_DIFF = Histogram(
    "fraud_challenger_score_diff", "Shadow score minus champion score on the same transaction",
    ["version"], buckets=(-0.5, -0.2, -0.1, -0.05, -0.02, -0.01, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
)
PREDICTION_LOG = Counter(
    "fraud_prediction_log_records_total", "Prediction log records by sink and outcome",
    ["sink", "outcome"],  # outcome: written | delivered | failed | dropped
)


def retire(gauge: Gauge, *labels: str) -> None:
    """Take one labelled series of `gauge` out of the export (a replaced model, a closed drift
    window).  In one process the series is removed.  In multiprocess mode prometheus_client
    cannot remove a series from a worker's file, so it is set to 0 first: the workers' max or
    sum no longer counts it, and `== 1` / `> 0` queries drop it.
    """
    gauge.labels(*labels).set(0)
    # PROMETHEUS_MULTIPROC_DIR (which importing Feast sets too) only makes remove() warn
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Removal of labels", UserWarning)
        gauge.remove(*labels)


_OBSERVE_ALL_MIN = 16  # values; below, one `observe` each


def observe_all(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """`histogram.observe(v)` for every one of `values` (a histogram without labels, or one
    child), at one increment per bucket instead of one call per value: prometheus_client has
    no batch observe.  The same bucket counts (the first bound `>=` each value; a NaN counts
    in none), and the sum grows by the values' sum (equal up to float rounding order).
    Reads the histogram's own bounds, buckets and sum (prometheus_client's attributes,
    pinned; `tests/unit/scoring/test_metrics.py` checks the result against `observe`)."""
    if len(values) < _OBSERVE_ALL_MIN:  # a few values: numpy's fixed cost is more
        for v in values:
            histogram.observe(float(v))
        return
    x = np.asarray(values, dtype=np.float64)
    histogram._raise_if_not_observable()
    bounds = histogram._upper_bounds
    at = np.searchsorted(np.asarray(bounds, dtype=np.float64), x[~np.isnan(x)], side="left")
    for i, n in enumerate(np.bincount(at, minlength=len(bounds)).tolist()):
        if n:
            histogram._buckets[i].inc(n)
    histogram._sum.inc(float(x.sum()))
