"""Scoring against a 3-master Redis Cluster vs one Redis node: `python -m serving`, same data.

The scoring data set (bench.data.scoring_dataset: its features already in one Redis database)
is materialized into a throw-away local 3-master cluster (devenv.redis_cluster, on this same
machine) with `feast materialize` under `REDIS_MODE=cluster`, against a copy of the data set's
SQLite registry (so the data set's recorded materialization intervals stay as they were).
Then our scorer runs twice, one at a time, on the same port settings and worker count:

* *ours* column: `REDIS_MODE=cluster`, `REDIS_URL` at one seed node (the scorer's reads go
  through redis-py's asyncio cluster pipeline: one round trip per node owning a key);
* *stock* column: the data set's single Redis node (`REDIS_MODE=standalone`), as in
  bench.scoring.

Both serve the data set's newest model artifact, pinned (`SERVING_MODEL_VERSION`, with
`SERVING_ALLOW_UNREGISTERED_MODELS`): what is compared is the feature lookup, not the model
registry.  Each run: 20 validation requests (the same transactions and times in both modes; their feature
values must be identical), a warm-up, `rate` requests/s open loop (latency p50/p99), and the
peak closed-loop throughput (wrk if installed, else bench.loadgen).  Every Redis process, the
load generator and the scorer share this machine's cores: the comparison shows the cost of the
cluster client, not what a cluster of machines adds.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen
from bench.config import Sizes, get_settings
from bench.data import Dataset, scoring_dataset, with_loadable_model
from bench.procs import BenchError, free_port, run_step, running, wait_http
from bench.report import Measure, Section
from bench.scoring import HOST, Server, ours_server, request_factory, request_pool
from devenv import redis_cluster

VALIDATION_REQUESTS = 20


def _registry_copy(dataset: Dataset, workdir: Path) -> str:
    """A copy of the data set's SQLite registry (its own URL when it is not SQLite)."""
    prefix = "sqlite:///"
    if not dataset.registry_url.startswith(prefix):
        return dataset.registry_url
    copy = workdir / "registry.db"
    shutil.copyfile(dataset.registry_url[len(prefix):], copy)
    return f"{prefix}{copy}"


def _materialize(dataset: Dataset, env: dict[str, str], log: Path) -> float:
    feast = [str(Path(sys.executable).parent / "feast"), "-c", "feature_repo"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return run_step("feast materialize (cluster)",
                    [*feast, "materialize", "2000-01-01T00:00:00", now], env, log, 3600)


def _validate(server: Server, port: int, wall: float) -> tuple[dict[str, Any], list[Any]]:
    """VALIDATION_REQUESTS requests at the fixed time `wall`: statuses, how many had missing
    features, and each answer's feature values (to compare the two modes)."""
    out: dict[str, Any] = {"statuses": {}, "with_missing_features": 0}
    answers: list[Any] = []
    with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=10) as client:
        for i in range(VALIDATION_REQUESTS):
            r = client.post(f"{server.path}?explain=true", content=server.body(i, wall),
                            headers={"content-type": "application/json"})
            out["statuses"][str(r.status_code)] = out["statuses"].get(str(r.status_code), 0) + 1
            if r.status_code != 200:
                out.setdefault("example_error", r.text[:300])
                answers.append(None)
                continue
            body = r.json()
            out["with_missing_features"] += bool(body["missing_features"])
            answers.append({k: v["value"] for k, v in body["features"].items()})
    return out, answers


def _measure(server: Server, env: dict[str, str], sizes: Sizes, wall: float,
             log: Path) -> tuple[dict[str, Any], list[Any]]:
    port = int(server.argv[server.argv.index("--port") + 1])
    with running(server.name, server.argv, env, log) as child:
        t0 = time.perf_counter()
        wait_http(f"http://{HOST}:{port}{server.ready_path}", child,
                  get_settings().server_start_timeout_s)
        res: dict[str, Any] = {"startup_s": time.perf_counter() - t0}
        res["validation"], answers = _validate(server, port, wall)
        make = request_factory(server, port)
        loadgen.open_loop(HOST, port, make, sizes.score_rate, sizes.score_warmup_s,
                          sizes.score_connections, drain_s=2)
        res["open_loop"] = loadgen.open_loop(HOST, port, make, sizes.score_rate,
                                             sizes.score_duration_s, sizes.score_connections,
                                             drain_s=5).summary()
        if loadgen.wrk_available():
            res["peak"] = loadgen.wrk_closed_loop(
                HOST, port, server.path,
                loadgen.wrk_script(server.wrk_bodies, server.wrk_ts_lua),
                sizes.score_peak_duration_s, sizes.score_connections).summary()
        else:
            res["peak"] = {"tool": "bench.loadgen closed loop", **loadgen.closed_loop(
                HOST, port, make, sizes.score_peak_duration_s,
                sizes.score_connections).summary()}
    return res, answers


def _pinned_model(dataset: Dataset) -> dict[str, str]:
    """Environment pinning the data set's newest model artifact (no registry involved)."""
    metas = sorted(dataset.model_dir.glob("*/metadata.json"))
    if not metas:
        raise BenchError(f"no model artifact under {dataset.model_dir}")
    return {"SERVING_MODEL_VERSION": metas[-1].parent.name,
            "SERVING_ALLOW_UNREGISTERED_MODELS": "true"}


def _keys_per_node(cluster: redis_cluster.LocalRedisCluster) -> dict[str, int]:
    out = {}
    for port in cluster.ports:
        with cluster.node(port) as node:
            out[str(port)] = int(node.dbsize())
    return out


def run(sizes: Sizes, section: Section) -> None:
    s = get_settings()
    log_dir = s.run_dir / "logs"
    dataset, model_note = with_loadable_model(scoring_dataset())
    if model_note:
        section.notes.append(model_note)
    pool = request_pool(dataset)
    wall = time.time()
    section.ours_label = (f"`python -m serving --workers {s.workers}` on a 3-master Redis "
                          "Cluster (REDIS_MODE=cluster)")
    section.stock_label = (f"`python -m serving --workers {s.workers}` on one Redis node "
                           "(REDIS_MODE=standalone)")
    results: dict[str, Any] = {}
    answers: dict[str, list[Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cluster-", dir=s.run_dir) as tmp:
        workdir = Path(tmp)
        with redis_cluster.start(workdir / "nodes") as cluster:
            pinned = _pinned_model(dataset)
            cluster_env = dataset.env(REDIS_MODE="cluster", REDIS_URL=cluster.url,
                                      FEAST_REGISTRY_URL=_registry_copy(dataset, workdir),
                                      SERVING_LOG_LEVEL="WARNING", **pinned)
            seconds = _materialize(dataset, cluster_env, log_dir / "cluster-materialize.log")
            keys = _keys_per_node(cluster)
            if min(keys.values()) == 0:
                raise BenchError(f"materialization left a primary empty: {keys}")
            runs = [("cluster", cluster_env),
                    ("standalone", dataset.env(REDIS_MODE="standalone",
                                               SERVING_LOG_LEVEL="WARNING", **pinned))]
            for mode, env in runs:
                server = ours_server(pool, free_port(), s.workers)
                results[mode], answers[mode] = _measure(
                    server, env, sizes, wall, log_dir / f"cluster-bench-{mode}-server.log")
    identical = answers["cluster"] == answers["standalone"] and all(
        a is not None for a in answers["cluster"])
    section.details = {**results, "keys_per_primary": keys, "materialize_s": seconds,
                       "identical_features": identical}
    section.notes += [
        f"Data: {dataset.describe()}; materialized into the cluster in {seconds:.0f} s "
        f"(keys per primary: {keys}). The 3 cluster nodes, the single node, the load "
        "generator and the scorer all share this machine's cores.",
        f"{VALIDATION_REQUESTS} validation requests (same transactions, same time) gave "
        f"{'identical' if identical else 'DIFFERENT'} feature values in both modes; "
        f"validation: cluster {results['cluster']['validation']}, standalone "
        f"{results['standalone']['validation']}.",
        f"Open loop: {sizes.score_rate:,.0f} requests/s for {sizes.score_duration_s:.0f} s over "
        f"{sizes.score_connections} connections after a {sizes.score_warmup_s:.0f} s warm-up; "
        f"peak: closed loop for {sizes.score_peak_duration_s:.0f} s.",
    ]
    if not identical:
        raise BenchError("the cluster and the single node answered different features")
    _measures(section, results["cluster"], results["standalone"], sizes)


def _measures(section: Section, cluster: dict[str, Any], node: dict[str, Any],
              sizes: Sizes) -> None:
    co, no = cluster["open_loop"], node["open_loop"]
    rate = f"@{sizes.score_rate:,.0f}/s"
    for q in ("p50", "p99"):
        section.measures.append(Measure(
            f"latency {q} {rate} open loop", "ms", co["latency_s"].get(q, float("nan")) * 1000,
            no["latency_s"].get(q, float("nan")) * 1000, "lower"))
    section.measures += [
        Measure(f"completed {rate} open loop", "/s", co["throughput"], no["throughput"],
                "higher", note=f"cluster statuses {co['statuses']}, {co['incomplete']:,} "
                               f"incomplete; standalone statuses {no['statuses']}, "
                               f"{no['incomplete']:,} incomplete"),
        Measure("peak throughput (closed loop)", "/s", cluster["peak"]["throughput"],
                node["peak"]["throughput"], "higher"),
    ]
