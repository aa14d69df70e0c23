"""Prometheus metrics of the scoring core, exported by every runtime that scores (the HTTP
and the stream scorer): lookups, model latency, scores, decisions, missing inputs, drift,
challengers and the prediction log."""

from __future__ import annotations

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
FEATURE_PSI = Gauge("fraud_feature_psi", "Population stability index vs training", ["feature"])

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
