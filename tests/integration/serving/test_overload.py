"""Overload is not an outage: a burst past the scorer's capacity is answered 503 "overloaded"
(with Retry-After) by the admission limit, never "online feature store unavailable" while Redis
is healthy, and the requests it admits keep a bounded latency (reported; single requests' p99
asserted under a generous bound).

The scorer runs in its own process (`python -m serving`) against the session's healthy Redis;
the burst is bounded in time and targets 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serving.admission import Admission, Overloaded
from tests.integration.test_faults import serve

BURST_S = 4.0
MAX_INFLIGHT_ROWS = 1500
# Admitted single requests stay bounded: at most the limit's rows (one explained 1,000-row batch
# takes about 1 s here) run ahead of one.  Generous for a loaded 2-core host; without the
# admission limit the issue measured a single-request p99 of 6.4 s.
SINGLE_P99_BOUND_S = 3.0


def _txn(i: int, user: str = "u0001") -> dict[str, Any]:
    return {"transaction_id": f"ov-{i}", "user_id": user, "merchant_id": "m0001",
            "amount": 10.0 + i % 50, "currency": "EUR", "channel": "online"}


def test_admission_refuses_past_the_limit_and_admits_a_large_request_when_idle() -> None:
    a = Admission(100)
    with a.admit(150):  # larger than the limit, but nothing else in flight
        with pytest.raises(Overloaded):
            with a.admit(1):
                pass
    with a.admit(60), a.admit(40):
        assert a.inflight == 100
        with pytest.raises(Overloaded):
            with a.admit(1):
                pass
    assert a.inflight == 0


async def _burst(base: str) -> list[tuple[str, int, str, str | None, float]]:
    """(kind, status, detail, Retry-After, seconds) of every answer within BURST_S."""
    out: list[tuple[str, int, str, str | None, float]] = []
    stop = time.monotonic() + BURST_S
    batch = {"transactions": [_txn(i, f"u{i % 300:04d}") for i in range(1000)]}

    async def fire(c: httpx.AsyncClient, kind: str, k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            t0 = time.perf_counter()
            if kind == "batch":
                r = await c.post("/v1/score/batch?explain=true", json=batch)
            else:
                r = await c.post("/v1/score", json=_txn(k * 100_000 + i))
            detail = "" if r.status_code == 200 else str(r.json().get("detail"))
            out.append((kind, r.status_code, detail, r.headers.get("retry-after"),
                        time.perf_counter() - t0))
            if kind == "single":
                await asyncio.sleep(0.01)

    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=base, timeout=30.0, limits=limits) as c:
        await asyncio.gather(*(fire(c, "batch", k) for k in range(4)),
                             *(fire(c, "single", k) for k in range(8)))
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_a_burst_past_capacity_is_overloaded_never_unavailable(
    trained_artifact: Path, materialized_store: Any, tmp_path: Path
) -> None:
    env = {"SERVING_MODEL_DIR": str(trained_artifact.parent),
           "SERVING_MODEL_VERSION": trained_artifact.name, "SERVING_RELOAD_INTERVAL_S": "0",
           "SERVING_MAX_INFLIGHT_ROWS": str(MAX_INFLIGHT_ROWS)}
    with serve(env, tmp_path / "scorer.log") as base:
        answers = asyncio.run(_burst(base))
        metrics = httpx.get(base + "/metrics", timeout=5.0).text
        ready = httpx.get(base + "/ready", timeout=5.0).status_code
    refused = [a for a in answers if a[1] != 200]
    assert {(s, d) for _, s, d, _, _ in refused} <= {(503, "overloaded")}, refused[:5]
    assert all(retry is not None for _, _, _, retry, _ in refused)
    assert any(kind == "batch" for kind, *_ in refused), "the burst never passed the limit"
    assert 'fraud_overload_rejections_total{reason="admission"}' in metrics
    assert ready == 200  # Redis was healthy all along
    for kind in ("single", "batch"):
        ok = [t for k, s, _, _, t in answers if k == kind and s == 200]
        assert ok, f"no {kind} request was admitted"
        p50, p99 = np.percentile(ok, [50, 99]) * 1000
        n = sum(1 for a in answers if a[0] == kind)
        print(f"{kind}: {len(ok)} of {n} admitted, p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
              f"{n - len(ok)} answered 503 overloaded")
        if kind == "single":
            assert p99 < SINGLE_P99_BOUND_S * 1000, f"admitted singles' p99 {p99:.0f} ms"
