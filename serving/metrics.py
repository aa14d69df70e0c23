"""Prometheus metrics of the HTTP scorer (names shared with the Grafana dashboard); the
scoring core's own families (scores, decisions, lookups, challengers) are `scoring.metrics`.

One process (`python -m serving`) exports its metrics from memory.  Under
`python -m serving --workers N` every worker writes its values to files in a directory
`serving/__main__.py` creates (prometheus_client's multiprocess mode), and `/metrics`, whichever
worker answers it, merges all of them (`exposition`): counters and histograms add up, and a
worker that exited keeps its totals there, so a counter never goes backwards; each gauge is
combined by the `multiprocess_mode` given where it is defined, over live workers only.
"""

from __future__ import annotations

import glob
import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from scoring.metrics import LATENCY_BUCKETS

REQUESTS = Counter("fraud_requests_total", "HTTP requests", ["route", "method", "status"])
REQUEST_LATENCY = Histogram(
    "fraud_request_latency_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS
)
# workers: 1 while any live worker serves the version (several during a rolling reload)
MODEL_INFO = Gauge("fraud_model_info", "Loaded model", ["version", "feature_service"],
                   multiprocess_mode="livemax")
CHALLENGER_INFO = Gauge(
    "fraud_challenger_info", "Loaded challenger model", ["version", "feature_service", "mode"],
    multiprocess_mode="livemax",
)
MODEL_RELOADS = Counter("fraud_model_reloads_total", "Model set reloads", ["outcome"])
REGISTRY_OK = Gauge(
    "fraud_model_registry_ok",
    "1 while the model registry describes a verified model set; 0 after a refused reload "
    "(the scorer keeps serving what it had)",
    # workers: 0 as soon as one worker refused, and while one is still starting (seconds; the
    # alert waits 5 minutes)
    multiprocess_mode="livemin")


def multiprocess_dir() -> str | None:
    """The directory this process's metric values are written to, or None when they live in
    its memory.

    PROMETHEUS_MULTIPROC_DIR alone does not tell: importing Feast (`feast.metrics`, which
    `feast.feature_server` imports) sets it to a directory of its own *after* prometheus_client
    chose in-memory values, which it does once, when it is imported.  That choice is what
    counts; the variable then names the directory.
    """
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def exposition() -> bytes:
    """The text format `/metrics` answers: this process's metrics, or every worker's."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest()
    forget_dead_workers(path)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)
    return generate_latest(registry)


def forget_dead_workers(path: str) -> None:
    """Drop the live gauges of workers that no longer run.  A worker that exits normally does
    this itself (`mark_process_dead` at exit, serving/__main__.py); one that was killed cannot,
    and uvicorn replaces it under a new pid."""
    for file in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid = os.path.basename(file)[:-len(".db")].rsplit("_", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            mark_process_dead(int(pid), path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours to judge
        return True
    return True
