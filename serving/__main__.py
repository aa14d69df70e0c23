"""`python -m serving [--host H] [--port P] [--workers N]`: run the scorer with uvicorn.

With `--workers N` (`SERVING_WORKERS`) uvicorn runs N worker processes on one port.  Each is a
complete scorer: its own feature store client, models, admission limit and registry poller, so
each reloads the champion by itself within `SERVING_RELOAD_INTERVAL_S` of a change to the
model registry (`/admin/*` calls act on the one worker that answers them).  Their metrics are
merged through prometheus_client's multiprocess mode: this process creates a fresh private
directory for the workers' metric files before it starts them, and removes it when it stops
(serving/metrics.py).
"""

from __future__ import annotations

import os

# One OpenMP thread per process, set before numpy/sklearn load their runtime: a request scores
# a handful of rows, where thread fan-out only adds latency (replicas and workers scale out).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import atexit
import logging
import shutil
import tempfile

import uvicorn
from fastapi import FastAPI
from prometheus_client.multiprocess import mark_process_dead

from serving import logs, metrics
from serving.app import create_app
from serving.config import get_settings

log = logging.getLogger("serving")


def main(argv: list[str] | None = None) -> None:
    s = get_settings()
    p = argparse.ArgumentParser(description="fraudstream scorer")
    p.add_argument("--host", default=s.host)
    p.add_argument("--port", type=int, default=s.port)
    p.add_argument("--workers", type=int, default=s.workers)
    a = p.parse_args(argv)
    logs.configure(s.log_level)
    if a.workers <= 1:
        uvicorn.run(create_app(s), host=a.host, port=a.port, access_log=False, log_config=None)
        return
    if s.reload_interval_s <= 0:
        log.warning("SERVING_RELOAD_INTERVAL_S=0 with %d workers: a promotion reloads only the "
                    "worker that answers /admin; the others keep their models", a.workers)
    metrics_dir = tempfile.mkdtemp(prefix="fraudstream-metrics-")  # empty, mode 0700
    # Read by prometheus_client when a worker imports it, before any metric exists there
    # (workers are spawned, not forked).  Feast's variable too, so its import in a worker
    # neither makes a directory of its own nor points prometheus_client elsewhere.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["PROMETHEUS_MULTIPROCESS_DIR"] = metrics_dir
    try:
        uvicorn.run("serving.__main__:app_factory", factory=True, host=a.host, port=a.port,
                    workers=a.workers, access_log=False, log_config=None)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def app_factory() -> FastAPI:
    """One worker's app (uvicorn calls it in each worker process)."""
    settings = get_settings()
    logs.configure(settings.log_level)
    metrics_dir = metrics.multiprocess_dir()
    if metrics_dir is not None:  # its live gauges leave the merge when it exits
        atexit.register(mark_process_dead, os.getpid(), metrics_dir)
    return create_app(settings)


if __name__ == "__main__":
    main()
