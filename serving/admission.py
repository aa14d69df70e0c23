"""Overload is not an outage: an admission limit and a measure of event-loop saturation.

* `Admission` bounds the rows being scored at once (`SERVING_MAX_INFLIGHT_ROWS`).  A request
  that would pass the bound is refused at once with 503 `{"detail": "overloaded"}` and
  `Retry-After`, before any lookup: admitted requests keep a bounded queue ahead of them, so
  their latency stays bounded, and a burst costs the refused callers one cheap answer.  A
  request larger than the bound alone is admitted when nothing else is in flight (a batch of
  `SERVING_MAX_BATCH` is never refused for its size).
* `LoopLag` measures how late the event loop runs its timers.  A lookup that misses its
  deadline while the loop itself is late did not find Redis slow: the process was saturated,
  and the answer is "overloaded", not "online feature store unavailable".

Metrics: `fraud_inflight_rows`, `fraud_overload_rejections_total{reason}`,
`fraud_event_loop_lag_seconds` (the latest lateness of the monitor's tick).  Under
`--workers N` each worker has its own admission limit and loop: the gauges export the total
rows in flight and the most saturated worker's lag.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator

from prometheus_client import Counter, Gauge

INFLIGHT_ROWS = Gauge("fraud_inflight_rows", "Transactions being scored right now",
                      multiprocess_mode="livesum")  # workers: the total in flight
OVERLOAD_REJECTIONS = Counter(
    "fraud_overload_rejections_total",
    "Scoring requests answered 503 overloaded: admission limit, or a lookup deadline missed "
    "while the event loop was saturated", ["reason"])
LOOP_LAG = Gauge("fraud_event_loop_lag_seconds", "How late the event loop ran its last timer",
                 multiprocess_mode="livemax")  # workers: the most saturated one


class Overloaded(Exception):
    """The scorer has no capacity for this request now (503 overloaded, Retry-After)."""


class Admission:
    """Bounded in-flight rows, on one event loop (no locking needed)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.inflight = 0

    @contextlib.contextmanager
    def admit(self, rows: int) -> Iterator[None]:
        """Hold `rows` of capacity for the block, or raise Overloaded at once."""
        if self.inflight and self.inflight + rows > self.max_rows:
            OVERLOAD_REJECTIONS.labels("admission").inc()
            raise Overloaded(f"{self.inflight} rows in flight, limit {self.max_rows}")
        self.inflight += rows
        INFLIGHT_ROWS.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= rows
            INFLIGHT_ROWS.set(self.inflight)


class LoopLag:
    """Ticks every `interval_s` and records how late each tick ran, over a `window_s` window."""

    def __init__(self, interval_s: float = 0.05, window_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self._recent: deque[tuple[float, float]] = deque()  # (tick time, lateness)
        self._last_tick: float | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._last_tick = loop.time()
            await asyncio.sleep(self.interval_s)
            now = loop.time()
            lag = max(0.0, now - self._last_tick - self.interval_s)
            self._recent.append((now, lag))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            LOOP_LAG.set(lag)

    def recent_max(self) -> float:
        """The worst lateness seen within the window, counting a tick that is overdue now."""
        if self._last_tick is None:
            return 0.0
        now = asyncio.get_running_loop().time()
        overdue = max(0.0, now - self._last_tick - self.interval_s)
        return max([overdue, *(lag for t, lag in self._recent if t >= now - self.window_s)])
