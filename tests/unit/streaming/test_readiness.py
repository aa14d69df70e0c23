"""`/ready` of a dataflow process: 503 until the dataflow polls its inputs, then 200; and the
recovery partitions each process of a cluster creates."""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from streaming import metrics
from streaming.cluster import free_ports
from streaming.readiness import Readiness, ReadinessProbe
from streaming.recovery import ensure_recovery_dir, recovery_partitions


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_ready_answers_503_until_the_flow_runs_then_200_and_metrics_stay_served() -> None:
    readiness = Readiness(process_id=1, processes=2)
    (port,) = free_ports(1)
    metrics.start_metrics_server("127.0.0.1", port, readiness.http)
    status, body = _get(port, "/ready")
    before = json.loads(body)
    assert status == 503 and before["ready"] is False and before["startup_s"] is None

    out: list[Any] = []
    flow = Dataflow("probe_test")
    op.output("out", op.input("in", flow, TestingSource([1, 2, 3])), TestingSink(out))
    op.input("ready", flow, ReadinessProbe(readiness))
    readiness.partition_assigned("1-transactions")
    run_main(flow)  # ends: the probe ends after marking the process running

    status, body = _get(port, "/ready")
    after = json.loads(body)
    assert status == 200 and out == [1, 2, 3]
    assert after["ready"] is True and after["startup_s"] > 0
    assert (after["process_id"], after["processes"], after["partitions"]) == (
        1, 2, ["1-transactions"])
    status, text = _get(port, "/metrics")
    assert status == 200 and b"fraud_stream_ready 1.0" in text


def _parts(directory: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in sorted(directory.glob("part-*.sqlite3")):
        with sqlite3.connect(p) as db:
            out[p.name] = db.execute("SELECT part_index, part_count FROM parts").fetchone()
    return out


def test_each_process_creates_its_share_of_the_recovery_partitions(tmp_path: Path) -> None:
    count = recovery_partitions(1, 2)
    assert count == 2 and recovery_partitions(4, 2) == 4
    for k in (0, 1):  # two hosts, a local directory each
        ensure_recovery_dir(tmp_path / f"host-{k}", count, k, 2)
    assert _parts(tmp_path / "host-0") == {"part-0.sqlite3": (0, 2)}
    assert _parts(tmp_path / "host-1") == {"part-1.sqlite3": (1, 2)}
    # one directory for both processes: each creates its share, in either order
    ensure_recovery_dir(tmp_path / "shared", count, 1, 2)
    ensure_recovery_dir(tmp_path / "shared", count, 0, 2)
    assert _parts(tmp_path / "shared") == {"part-0.sqlite3": (0, 2), "part-1.sqlite3": (1, 2)}
    # an existing set keeps its count: nothing is added, reset or re-created
    ensure_recovery_dir(tmp_path / "shared", 4)
    ensure_recovery_dir(tmp_path / "host-0", 4, 0, 2)
    assert _parts(tmp_path / "shared") == {"part-0.sqlite3": (0, 2), "part-1.sqlite3": (1, 2)}
    assert _parts(tmp_path / "host-0") == {"part-0.sqlite3": (0, 2)}
    assert not list((tmp_path / "shared").glob(".init-*"))
