"""Prometheus metrics of the scorer (names shared with the Grafana dashboard)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.5, 1)

REQUESTS = Counter("fraud_requests_total", "HTTP requests", ["route", "method", "status"])
REQUEST_LATENCY = Histogram(
    "fraud_request_latency_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS
)
LOOKUP_LATENCY = Histogram(
    "fraud_online_lookup_seconds", "Online feature lookup latency", buckets=_LATENCY_BUCKETS
)
MODEL_LATENCY = Histogram(
    "fraud_model_latency_seconds", "Model inference latency", buckets=_LATENCY_BUCKETS
)
SCORE = Histogram("fraud_score", "Model scores", buckets=tuple(i / 20 for i in range(1, 21)))
DECISIONS = Counter("fraud_decisions_total", "Decisions", ["decision"])
MISSING = Counter(
    "fraud_missing_features_total", "Model inputs missing at scoring time", ["feature", "reason"]
)
MODEL_INFO = Gauge("fraud_model_info", "Loaded model", ["version", "feature_service"])
FEATURE_PSI = Gauge("fraud_feature_psi", "Population stability index vs training", ["feature"])

# --- model lifecycle: challenger and reloads ---------------------------------------------------
CHALLENGER_INFO = Gauge(
    "fraud_challenger_info", "Loaded challenger model", ["version", "feature_service", "mode"]
)
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
MODEL_RELOADS = Counter("fraud_model_reloads_total", "Model set reloads", ["outcome"])
REGISTRY_OK = Gauge(
    "fraud_model_registry_ok",
    "1 while the model registry describes a verified model set; 0 after a refused reload "
    "(the scorer keeps serving what it had)")
PREDICTION_LOG = Counter(
    "fraud_prediction_log_records_total", "Prediction log records by sink and outcome",
    ["sink", "outcome"],  # outcome: written | delivered | failed | dropped
)
