"""`python -m serving --workers 2`: one `/metrics` for the whole fleet of worker processes.

Without prometheus_client's multiprocess mode each worker exported its own counters, and a
scrape read whichever worker answered it (after 20 requests: 11, 11, 11, 9, 9, 11: counter
resets for Prometheus).  Here a real scorer with two workers on a free loopback port scores
exactly 50 requests; then every scrape, whichever worker answers it, reads exactly 50.  Also:
a promotion reaches every worker through its own registry poller; a SIGKILLed worker (which
uvicorn replaces) keeps its counts in the totals and drops out of the live gauges; the metrics
directory is private and is removed when the scorer stops.  One process (`python -m serving`)
keeps exporting from memory: tests/integration/serving/test_api.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from scoring.registry import Registry
from tests.procs import clone_artifact, serve, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUESTS = 50
SCRAPES = 8
METRIC_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db")
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(base: str) -> Samples:
    """One scrape on a new connection (so the kernel may hand it to either worker)."""
    resp = httpx.get(base + "/metrics", timeout=10.0, headers={"connection": "close"})
    assert resp.status_code == 200, resp.text
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


def counted(base: str) -> float:
    return total(scrape(base), "fraud_requests_total", route="/v1/score")


def score(base: str, i: int) -> str:
    body = {"transaction_id": f"mp-{i}", "user_id": f"mp-u{i % 7}", "merchant_id": "mp-shop",
            "amount": 10.0 + i, "currency": "EUR", "channel": "online"}
    resp = httpx.post(base + "/v1/score", json=body, timeout=10.0,
                      headers={"connection": "close"})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["model_version"])


def score_all(base: str, ids: range) -> list[str]:
    with ThreadPoolExecutor(8) as ex:
        return list(ex.map(lambda i: score(base, i), ids))


@contextmanager
def stopped(worker: psutil.Process) -> Iterator[None]:
    """`worker` SIGSTOPped for the block: it accepts no connection meanwhile."""
    worker.suspend()
    try:
        yield
    finally:
        worker.resume()


def workers(server: psutil.Process) -> list[psutil.Process]:
    """The running worker processes of `server` (not a killed one uvicorn has not reaped)."""
    out = []
    for child in server.children():
        try:
            if (child.status() != psutil.STATUS_ZOMBIE
                    and "spawn_main" in " ".join(child.cmdline())):
                out.append(child)
        except psutil.Error:  # gone, or a zombie, in between
            continue
    return out


def metric_files(worker: psutil.Process) -> list[Path]:
    """The prometheus_client value files `worker` has open (counter_<pid>.db, ...)."""
    return sorted({Path(f.path) for f in worker.open_files()  # a file may be open twice
                   if METRIC_FILE.fullmatch(Path(f.path).name)})


def test_two_workers_export_one_consistent_set_of_metrics(
    trained_artifact: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models"
    registry = Registry(model_dir)
    registry.register(clone_artifact(trained_artifact, model_dir, "mp-a"))  # the champion
    registry.register(clone_artifact(trained_artifact, model_dir, "mp-b"))  # promoted below
    env = {"SERVING_WORKERS": "2", "SERVING_MODEL_DIR": str(model_dir),
           "SERVING_RELOAD_INTERVAL_S": "0.5"}
    with serve(env, tmp_path / "scorer.log") as (base, proc):
        server = psutil.Process(proc.pid)
        pool = wait_for("two workers", lambda: len(workers(server)) == 2 and workers(server), 60)
        wait_for("both workers ready", lambda: all(metric_files(w) for w in pool), 60)

        # Both workers must serve, or the test proves nothing; the kernel may hand every
        # connection to one of them.  So each half goes to one worker while the other is
        # stopped (briefly: uvicorn replaces a worker that misses its 5 s health check).
        first, second = pool
        half = REQUESTS // 2
        with stopped(second):
            versions = score_all(base, range(half))
        with stopped(first):
            versions += score_all(base, range(half, REQUESTS))
        assert set(versions) == {"mp-a"}
        # a request is counted once its answer is sent: let the last one land
        wait_for("the 50 requests counted", lambda: counted(base) == REQUESTS, 10)

        # each worker's own files: both served, and together exactly the 50 requests
        files = {w.pid: metric_files(w) for w in pool}
        metrics_dir = {f.parent for fs in files.values() for f in fs}
        assert len(metrics_dir) == 1, metrics_dir
        (directory,) = metrics_dir
        assert stat_mode(directory) == 0o700
        per_worker = {
            pid: sum(s.value for m in MultiProcessCollector.merge([str(f) for f in fs])
                     for s in m.samples if s.name == "fraud_requests_total"
                     and s.labels["route"] == "/v1/score")
            for pid, fs in files.items()}
        assert per_worker == {first.pid: half, second.pid: REQUESTS - half}, per_worker

        for _ in range(SCRAPES):
            m = scrape(base)
            assert total(m, "fraud_requests_total", route="/v1/score") == REQUESTS
            assert total(m, "fraud_requests_total", route="/v1/score", status="200") == REQUESTS
            assert total(m, "fraud_decisions_total") == REQUESTS
            assert total(m, "fraud_request_latency_seconds_count", route="/v1/score") == REQUESTS
            assert total(m, "fraud_score_count") == REQUESTS
            assert total(m, "fraud_model_info", version="mp-a") == 1  # livemax, not one per worker
            assert total(m, "fraud_model_registry_ok") == 1
            assert total(m, "fraud_inflight_rows") == 0

        # a promotion: every worker's poller reloads the new champion
        registry.promote("mp-b")

        seen: list[Samples] = []

        def promoted() -> bool:
            seen.append(m := scrape(base))
            return (total(m, "fraud_model_info", version="mp-b") == 1
                    and total(m, "fraud_model_info", version="mp-a") == 0
                    and total(m, "fraud_model_reloads_total", outcome="ok") == 2)  # once each

        try:
            wait_for("both workers to serve mp-b", promoted, 30)
        except AssertionError as exc:
            last = {k: seen[-1][k] for k in ("fraud_model_info", "fraud_model_reloads_total")}
            log = (tmp_path / "scorer.log").read_text()[-3000:]
            raise AssertionError(f"{exc}; last scrape {last}; scorer log:\n{log}") from None
        assert {score(base, REQUESTS + i) for i in range(20)} == {"mp-b"}
        wait_for("the 70 requests counted", lambda: counted(base) == REQUESTS + 20, 10)

        # a worker killed: uvicorn starts another; its counts stay, its live gauges go
        victim = pool[0]
        os.kill(victim.pid, signal.SIGKILL)
        (replacement,) = wait_for(
            "a replacement worker",
            lambda: len(now := workers(server)) == 2 and victim.pid not in {w.pid for w in now}
            and [w for w in now if w.pid != pool[1].pid], 60)
        # A starting worker reads fraud_model_registry_ok 0 (livemin) until its models load,
        # and before it has imported the metrics (no file of its own yet) the survivor alone
        # reads 1: wait for the replacement's own gauge file, then for 1.
        wait_for("the replacement worker started",
                 lambda: any(f.name.startswith("gauge_livemin_")
                             for f in metric_files(replacement))
                 and total(scrape(base), "fraud_model_registry_ok") == 1, 60)
        for _ in range(SCRAPES):
            m = scrape(base)
            assert total(m, "fraud_requests_total", route="/v1/score") == REQUESTS + 20
            assert total(m, "fraud_decisions_total") == REQUESTS + 20
            assert total(m, "fraud_model_info", version="mp-b") == 1
            assert total(m, "fraud_model_registry_ok") == 1
        assert not list(directory.glob(f"gauge_live*_{victim.pid}.db"))
        assert (directory / f"counter_{victim.pid}.db").exists()
    wait_for("the metrics directory removed at stop", lambda: not directory.exists(), 15)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_one_process_exports_from_memory() -> None:
    """`python -m serving` without workers: Feast's import sets PROMETHEUS_MULTIPROC_DIR after
    prometheus_client chose in-memory values, and /metrics must not read that directory."""
    code = ("import os, serving.__main__\n"
            "from serving import metrics\n"
            "assert os.environ.get('PROMETHEUS_MULTIPROC_DIR'), 'Feast no longer sets it'\n"
            "assert metrics.multiprocess_dir() is None\n"
            "metrics.REQUESTS.labels('/v1/score', 'POST', '200').inc(3)\n"
            "text = metrics.exposition().decode()\n"
            "assert 'fraud_requests_total{method=\"POST\",route=\"/v1/score\",status=\"200\"} 3.0'"
            " in text, text\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[3], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
