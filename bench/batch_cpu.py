"""`python -m bench.batch_cpu [--sizes 100,1000] [--batches N]`: CPU per `/v1/score/batch`
operation, in-process, on the scoring benchmark's data set (issue 20).

Builds what the scorer's lifespan builds (models, prediction log, `ScoringService`, one OpenMP
thread as `python -m serving` sets it, the heap as `feature_repo.heap.settle_heap` leaves it), then
times `serving.routes.scoring.score_many` on pre-validated batches of the benchmark's request
pool with `time.process_time()` (every thread of the process: the offloaded assembly and model
too).  HTTP parsing, validation and the socket writes are not in it: `python -m bench scoring`
measures the whole server.  The online store is only read.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as `python -m serving`, before numpy loads

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

from threadpoolctl import threadpool_limits

from bench.data import Dataset, scoring_dataset, with_loadable_model
from bench.scoring import request_pool
from feature_repo.heap import settle_heap
from scoring.prediction_log import PredictionLog
from serving.config import ServingSettings
from serving.lifecycle import ModelManager
from serving.routes.scoring import score_many
from serving.schemas import BatchIn
from serving.service import ScoringService


def _batch(pool: list[dict[str, Any]], rows: int, i: int) -> bytes:
    ts = datetime.now(UTC).isoformat()
    start = (i * rows) % max(1, len(pool) - rows)
    return json.dumps({"transactions": [
        {"transaction_id": f"b{i}-{j}", "user_id": r["user_id"], "merchant_id": r["merchant_id"],
         "amount": round(float(r["amount"]), 2), "currency": "EUR", "channel": r["channel"],
         "event_timestamp": ts} for j, r in enumerate(pool[start:start + rows])]}).encode()


async def _measure(dataset: Dataset, sizes: list[int], batches: int) -> dict[int, float]:
    threadpool_limits(1)
    settings = ServingSettings()
    manager = ModelManager.start(settings)
    plog = PredictionLog.from_settings(settings, manager.current.champion.artifact.path)
    service = ScoringService(settings, plog)
    pool = request_pool(dataset)
    settle_heap()  # as the lifespan leaves the heap
    out: dict[int, float] = {}
    try:
        for rows in sizes:
            n = max(10, batches * 100 // rows)
            bodies = [BatchIn.model_validate_json(_batch(pool, rows, i)) for i in range(n + 5)]
            for body in bodies[:5]:  # warm-up
                await score_many(service, manager.current, body)
            c0 = time.process_time()
            for body in bodies[5:]:
                await score_many(service, manager.current, body)
            out[rows] = (time.process_time() - c0) / n
    finally:
        plog.close()
        manager.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="rows per batch, comma-separated")
    parser.add_argument("--batches", type=int, default=200, help="of 100 rows (fewer if larger)")
    args = parser.parse_args()
    dataset, _ = with_loadable_model(scoring_dataset())
    env = dataset.env(SERVING_LOG_LEVEL="WARNING")
    for name in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"):
        env.pop(name, None)
        os.environ.pop(name, None)
    os.environ.update(env)
    sizes = [int(s) for s in args.sizes.split(",")]
    for rows, cpu in asyncio.run(_measure(dataset, sizes, args.batches)).items():
        print(f"batch of {rows:,}: {cpu * 1e3:.2f} ms of CPU per batch "  # noqa: T201 - CLI
              f"({dataset.name} data)")


if __name__ == "__main__":
    main()
