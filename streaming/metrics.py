"""Prometheus metrics of the streaming workers (served by `start_metrics_server`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS = Counter(
    "fraud_stream_events_total", "Events read by the feature dataflow, by outcome", ["outcome"]
)
DLQ = Counter("fraud_stream_dlq_total", "Events sent to the dead-letter topic", ["reason"])
DLQ_FAILED = Counter(
    "fraud_stream_dlq_failed_total",
    "Dead letters the dead-letter sink could not write within its retry budget (logged, skipped)",
    ["reason"],
)
OFFSET_RESETS = Counter(
    "fraud_stream_offset_resets_total",
    "Input partitions whose offset lay past the log's end or whose topic was recreated",
    ["partition"],
)
SOURCE_ERRORS = Counter(
    "fraud_stream_source_errors_total", "Errors reported by the Kafka input (not raised)", ["code"]
)
WRITE_BATCHES = Counter(
    "fraud_stream_write_batches_total", "Micro-batches written to the online store"
)
ROWS_WRITTEN = Counter(
    "fraud_stream_rows_written_total", "Velocity rows written", ["store"]
)
FRESHNESS = Histogram(
    "fraud_stream_freshness_seconds",
    "Event produced to feature servable in the online store",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60),
)
SNAPSHOT_USERS = Counter(
    "fraud_stream_snapshot_users_total",
    "User states written to recovery storage (a snapshot of a shard writes all its users)",
)
LAG = Gauge("fraud_stream_lag_events", "Events behind the end of the topic (estimate)")
PREDICTIONS = Counter(
    "fraud_stream_predictions_total", "Transactions scored by the streaming scorer", ["decision"]
)


def start_metrics_server(host: str, port: int) -> None:
    """Expose /metrics on host:port (loopback by default; 0 disables)."""
    if port:
        start_http_server(port, addr=host)
