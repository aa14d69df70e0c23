"""Prometheus metrics of the streaming workers (served by `start_metrics_server`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

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


READY = Gauge("fraud_stream_ready", "1 once this dataflow process runs (see /ready)")
STARTUP = Gauge("fraud_stream_startup_seconds",
                "Process start to dataflow running (partitions assigned, state restored)")

ReadyProbe = Callable[[], tuple[bool, bytes]]  # (ready, JSON body)
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def start_metrics_server(host: str, port: int, ready: ReadyProbe | None = None) -> None:
    """Serve /metrics on host:port (loopback by default; 0 disables) and, with `ready`,
    /ready: 200 once `ready()` says so, 503 before, with its JSON body either way."""
    if not port:
        return
    server = make_server(host, port, _app(make_wsgi_app(), ready), ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """No access log: a scrape every few seconds is not news."""


def _app(metrics_app: WsgiApp, ready: ReadyProbe | None) -> WsgiApp:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/ready" and ready is not None:
            ok, body = ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)

    return app
