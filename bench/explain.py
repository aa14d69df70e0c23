"""What `?explain=true` costs: `POST /v1/score` with and without explanations, same server, same run.

One `python -m serving` on the scoring data set (bench.data.scoring_dataset), serving its
newest model that loads (pinned).  After a warm-up of each kind, plain and explained requests
alternate in `ROUNDS` open-loop runs each, at the scoring benchmark's rate and request mix
(bench.scoring.ours_server: recent transactions, event_timestamp = now), so a drift in the
host's speed weighs on both; latencies are pooled per kind.  Reported: p50 and p99 (latency
from the scheduled send time) and the server's CPU per request, explained ("ours") against
plain ("stock" column).  The p99 target is the scoring budget, checked at full size only
(1,000 requests/s).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import httpx
import numpy as np

from bench import loadgen
from bench.config import Sizes, get_settings
from bench.data import newest_model, scoring_dataset, with_loadable_model
from bench.procs import BenchError, free_port, running, tree_cpu_seconds, wait_http
from bench.report import Measure, Section, Target
from bench.scoring import HOST, P99_TARGET_MS, ours_server, request_factory, request_pool

ROUNDS = 2
EXPLAIN_PATH = "/v1/score?explain=true"


def percentiles(latencies: list[np.ndarray]) -> dict[str, float]:
    """p50/p90/p99/max in ms of pooled open-loop latencies (unanswered: infinitely slow)."""
    v = np.concatenate(latencies) if latencies else np.zeros(0)
    if len(v) == 0:
        return {}
    v = np.where(np.isnan(v), np.inf, v) * 1000
    out = {k: float(np.percentile(v, q, method="higher"))
           for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
    out["max"] = float(v.max())
    return out


def check_explained(port: int, body: bytes) -> dict[str, Any]:
    """One explained request: the model must have an explainer, or the comparison is moot."""
    r = httpx.post(f"http://{HOST}:{port}{EXPLAIN_PATH}", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    if r.status_code != 200:
        raise BenchError(f"POST {EXPLAIN_PATH} answered {r.status_code}: {r.text[:300]}")
    e = r.json().get("explanation")
    if not e or not e.get("reasons"):
        raise BenchError("the served model returns no explanation (no explainer for it)")
    return {"base_value": e["base_value"], "top_reason": e["reasons"][0]}


def run(sizes: Sizes, section: Section) -> None:
    s = get_settings()
    dataset, model_note = with_loadable_model(scoring_dataset())
    if model_note:
        section.notes.append(model_note)
    pool = request_pool(dataset)
    port = free_port()
    plain = ours_server(pool, port, s.workers)
    explained = dataclasses.replace(plain, path=EXPLAIN_PATH)
    kinds = {"plain": request_factory(plain, port), "explain": request_factory(explained, port)}
    seconds = max(sizes.score_duration_s / ROUNDS, 1.0)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    latencies: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    cpu = {k: 0.0 for k in kinds}
    completed = {k: 0 for k in kinds}
    log = s.run_dir / "logs" / "explain-server.log"
    model = newest_model(dataset.model_dir)
    if model is None:
        raise BenchError(f"no model under {dataset.model_dir}")
    # the newest model, pinned whether or not a registry lists it: this measures explain, not
    # the registry (a development flag, never set in production)
    env = dataset.env(SERVING_LOG_LEVEL="WARNING", SERVING_MODEL_VERSION=model.name,
                      SERVING_ALLOW_UNREGISTERED_MODELS="true")
    with running("ours", plain.argv, env, log) as child:
        wait_http(f"http://{HOST}:{port}{plain.ready_path}", child, s.server_start_timeout_s)
        probe = check_explained(port, plain.body(0, time.time()))
        for make in kinds.values():  # warm-up: both code paths (and the explainer) built
            loadgen.open_loop(HOST, port, make, sizes.score_rate, sizes.score_warmup_s,
                              sizes.score_connections, drain_s=2)
        for _ in range(ROUNDS):
            for name, make in kinds.items():
                cpu0 = tree_cpu_seconds(child.pid)
                r = loadgen.open_loop(HOST, port, make, sizes.score_rate, seconds,
                                      sizes.score_connections, drain_s=5)
                cpu[name] += tree_cpu_seconds(child.pid) - cpu0
                completed[name] += r.completed
                latencies[name].append(r.latency)
                runs[name].append(r.summary())
    lat = {k: percentiles(v) for k, v in latencies.items()}
    cpu_ms = {k: cpu[k] * 1000 / max(completed[k], 1) for k in kinds}
    section.ours_label = f"`python -m serving --workers {s.workers}` POST {EXPLAIN_PATH}"
    section.stock_label = "POST /v1/score (same server, same run)"
    section.details = {"model": str(model), "latency_ms": lat,
                       "server_cpu_ms_per_request": cpu_ms, "runs": runs, "probe": probe}
    section.notes.append(
        f"Data: {dataset.describe()}. Open loop at {sizes.score_rate:,.0f} requests/s over "
        f"{sizes.score_connections} connections: {ROUNDS} rounds of {seconds:.1f} s per kind, "
        "alternated, after a warm-up of each; server CPU = its process tree's user + system "
        "time over the measured runs / completed requests.")
    at_size = sizes.label == "full"
    rate = f"@{sizes.score_rate:,.0f}/s"
    section.measures += [
        Measure(f"p50 latency {rate}", "ms", lat["explain"].get("p50"), lat["plain"].get("p50"),
                "lower"),
        Measure(f"p99 latency {rate}", "ms", lat["explain"].get("p99"), lat["plain"].get("p99"),
                "lower", Target("<=", P99_TARGET_MS) if at_size else None,
                note=f"max {lat['explain'].get('max', float('nan')):.1f} ms explained, "
                     f"{lat['plain'].get('max', float('nan')):.1f} ms plain"),
        Measure("server CPU per request", "ms", cpu_ms["explain"], cpu_ms["plain"], "lower"),
    ]
