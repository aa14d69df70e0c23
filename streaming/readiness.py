"""Readiness of one dataflow process: `/ready` on its metrics port answers 200 only once it runs.

"Ready" means this process's part of the dataflow is running: the cluster has formed (every
process of `-a` connected), Bytewax has read the resume point from the recovery partitions,
rebuilt this process's input partitions at their snapshot offsets (the Kafka consumers are
assigned) and restored the state of the keys routed to it.  Bytewax does all of that while it
builds the dataflow; `ReadinessProbe` is an input of its own that marks the process ready
once it is polled and this process's input partitions are built (or, for a process that reads
none, a short grace period later).  It emits nothing, then ends, so a flow that
reads to the end of its input (`STREAMING_TAIL=false`) still finishes.

Per process: each process of a cluster answers for itself (its own metrics port), and a
process killed and restarted is not ready again until its new incarnation runs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bytewax.inputs import DynamicSource, StatelessSourcePartition

from streaming import metrics


class Readiness:
    """What `/ready` reports for this process (thread-safe: Bytewax's worker thread writes,
    the metrics server's threads read)."""

    def __init__(self, process_id: int = 0, processes: int = 1) -> None:
        self.process_id = process_id
        self.processes = processes
        self._started = time.monotonic() - process_age_s()
        self._lock = threading.Lock()
        self._partitions: list[str] = []
        self._ready_after_s: float | None = None

    def partition_assigned(self, part: str) -> None:
        """An input partition this process reads (called when Bytewax builds it)."""
        with self._lock:
            self._partitions.append(part)

    def has_partitions(self) -> bool:
        with self._lock:
            return bool(self._partitions)

    def mark_running(self) -> None:
        """The dataflow polls its inputs: partitions assigned and state restored."""
        with self._lock:
            if self._ready_after_s is None:
                self._ready_after_s = time.monotonic() - self._started
                metrics.READY.set(1)
                metrics.STARTUP.set(self._ready_after_s)

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready_after_s is not None

    def report(self) -> dict[str, Any]:
        """The `/ready` body: ready, this process's id, pid, input partitions, start-up time
        (process start to running, seconds; None before)."""
        with self._lock:
            return {"ready": self._ready_after_s is not None, "process_id": self.process_id,
                    "processes": self.processes, "pid": os.getpid(),
                    "partitions": sorted(self._partitions), "startup_s": self._ready_after_s}

    def http(self) -> tuple[bool, bytes]:
        """(ready, JSON body of `report`) for `streaming.metrics.start_metrics_server`."""
        report = self.report()
        return bool(report["ready"]), json.dumps(report).encode()


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 where unknown), so the start-up
    time includes the interpreter's imports."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
    return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))


class _ProbePartition(StatelessSourcePartition[Any]):
    """Marks the process running once its input partitions are built.  In a cluster of
    several processes Bytewax may poll this input before it has built the Kafka partitions
    (their assignment is agreed between the processes), so the first poll alone is not
    enough: it waits for a partition, or `GRACE_S` for a process that reads none."""

    GRACE_S = 2.0
    POLL = timedelta(milliseconds=20)

    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness
        self._first_poll: float | None = None

    def next_batch(self) -> list[Any]:
        now = time.monotonic()
        if self._first_poll is None:
            self._first_poll = now
        if self._readiness.has_partitions() or now - self._first_poll >= self.GRACE_S:
            self._readiness.mark_running()
            raise StopIteration
        return []

    def next_awake(self) -> datetime | None:
        # None until the first poll (Bytewax asks before it; a time then would let a flow whose
        # other inputs end finish without ever polling this one), then every POLL
        return None if self._first_poll is None else datetime.now(UTC) + self.POLL


class ReadinessProbe(DynamicSource[Any]):
    """An input that emits nothing: its first poll marks `readiness` running, then it ends.
    Built on every worker, polled only once the whole dataflow is built and resumed."""

    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ProbePartition:
        return _ProbePartition(self._readiness)
