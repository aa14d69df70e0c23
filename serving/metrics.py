"""Prometheus metrics of the HTTP scorer (names shared with the Grafana dashboard); the
scoring core's own families (scores, decisions, lookups, challengers) are `scoring.metrics`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from scoring.metrics import LATENCY_BUCKETS

REQUESTS = Counter("fraud_requests_total", "HTTP requests", ["route", "method", "status"])
REQUEST_LATENCY = Histogram(
    "fraud_request_latency_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS
)
MODEL_INFO = Gauge("fraud_model_info", "Loaded model", ["version", "feature_service"])
CHALLENGER_INFO = Gauge(
    "fraud_challenger_info", "Loaded challenger model", ["version", "feature_service", "mode"]
)
MODEL_RELOADS = Counter("fraud_model_reloads_total", "Model set reloads", ["outcome"])
REGISTRY_OK = Gauge(
    "fraud_model_registry_ok",
    "1 while the model registry describes a verified model set; 0 after a refused reload "
    "(the scorer keeps serving what it had)")
