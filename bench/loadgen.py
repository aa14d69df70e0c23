"""Open-loop HTTP/1.1 load generator for 127.0.0.1 (fixed arrival rate, no coordinated omission).

Why not wrk: wrk is closed-loop (a connection sends its next request only after the previous
answer), so a slow response delays the requests behind it and their waiting time is never
measured ("coordinated omission").  wrk2 fixes this with a constant rate but is not packaged by
Debian.  This module does what wrk2 does, in asyncio with raw keep-alive sockets:

* request i is *scheduled* at `start + i / rate`, whatever happened before; connection k sends
  requests k, k + C, k + 2C ... (C connections), so a connection that is still waiting for an
  answer sends its next request late, and
* latency is measured from the scheduled time (or from the actual send if that was earlier,
  see below) to the last byte of the response, so queueing anywhere, including in this client,
  is counted.

The event loop wakes timers with millisecond granularity, so each send is aimed half a
millisecond early; a request sent before its scheduled time is timed from its actual send.  The
client's own lateness is reported separately (`send_lag`), as is the service time measured from
the actual send.  Requests still unanswered (or unsent) at the hard stop are counted as
`incomplete` and enter the percentiles as infinitely slow.

`closed_loop` is the classic max-throughput mode (each connection sends as soon as it has its
answer), used when wrk is not installed.  Everything is bounded by `duration_s` plus a drain
period, and only loopback hosts are accepted.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
EARLY_S = 0.0005  # aim sends this much before their time (timer granularity is 1 ms)

# (request index, scheduled wall-clock time in epoch seconds) -> full HTTP request bytes
RequestFactory = Callable[[int, float], bytes]


def http_post(host: str, port: int, path: str, body: bytes) -> bytes:
    """A keep-alive HTTP/1.1 POST of a JSON body."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


@dataclass
class LoadResult:
    """What one load run measured; latencies in seconds, NaN = incomplete."""

    mode: str  # "open" or "closed"
    rate: float | None  # offered arrivals/s (open loop)
    duration_s: float
    connections: int
    latency: np.ndarray  # open: from the scheduled time; closed: from the send
    service: np.ndarray  # from the actual send
    send_lag: np.ndarray  # actual send minus scheduled time (open loop)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # broken connections
    # open loop: per request, its HTTP status; 0 = not answered, -1 = connection broken
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    elapsed_s: float = 0.0

    @property
    def completed(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.latency)))

    @property
    def incomplete(self) -> int:
        return len(self.latency) - self.completed

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def throughput(self) -> float:
        """Completed requests per second of the measured period."""
        return self.completed / self.elapsed_s if self.elapsed_s else 0.0

    def percentiles(self, which: str = "latency") -> dict[str, float]:
        """p50/p90/p99/p99.9/max in seconds; incomplete requests count as infinitely slow."""
        values = getattr(self, which)
        if len(values) == 0:
            return {}
        v = np.where(np.isnan(values), np.inf, values)
        qs = {"p50": 50, "p90": 90, "p99": 99, "p99.9": 99.9}
        out = {k: float(np.percentile(v, q, method="higher")) for k, q in qs.items()}
        out["max"] = float(v.max())
        return out

    def summary(self) -> dict[str, object]:
        return {
            "mode": self.mode, "offered_rate": self.rate, "duration_s": self.duration_s,
            "connections": self.connections, "scheduled": len(self.latency),
            "completed": self.completed, "incomplete": self.incomplete, "ok": self.ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors, "throughput": round(self.throughput, 1),
            "latency_s": self.percentiles("latency"), "service_s": self.percentiles("service"),
            "send_lag_s": self.percentiles("send_lag") if self.mode == "open" else {},
        }


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            waiter.set_exception(ConnectionError("response without Content-Length"))
            return
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17: line_end if line_end > 0 else None])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        status = int(head[9:12])
        del self.buffer[:total]
        waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))
        self.transport = None

    async def request(self, data: bytes) -> int:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


async def _connect(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, host, port)
    return conn


def _check_host(host: str) -> None:
    if host not in LOOPBACK:
        raise ValueError(f"the load generator only targets loopback, not {host!r}")


async def _open_loop(host: str, port: int, make: RequestFactory, rate: float,
                     duration_s: float, connections: int, drain_s: float) -> LoadResult:
    n = int(math.floor(rate * duration_s))
    lat = np.full(n, np.nan)
    svc = np.full(n, np.nan)
    lag = np.full(n, np.nan)
    res = LoadResult("open", rate, duration_s, connections, lat, svc, lag)
    codes = res.codes = np.zeros(n, np.int16)
    conns = [await _connect(host, port) for _ in range(connections)]
    t0 = time.perf_counter() + 0.05
    wall0 = time.time() + (t0 - time.perf_counter())
    hard_stop = t0 + duration_s + drain_s
    stopping = False

    async def worker(k: int, conn: _Connection) -> None:
        for i in range(k, n, connections):
            sched = t0 + i / rate
            delay = sched - EARLY_S - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            if sent >= hard_stop:
                return
            data = make(i, wall0 + (sched - t0))
            try:
                status = await conn.request(data)
            except (ConnectionError, OSError):
                if not stopping:
                    res.errors += 1
                    codes[i] = -1
                return
            done = time.perf_counter()
            codes[i] = status
            lat[i] = done - min(sched, sent)
            svc[i] = done - sent
            lag[i] = sent - sched
            res.statuses[status] = res.statuses.get(status, 0) + 1

    def stop() -> None:  # the hard stop: abandon what is still in flight
        nonlocal stopping
        stopping = True
        for c in conns:
            if c.transport is not None:
                c.transport.abort()

    watchdog = asyncio.get_running_loop().call_at(
        asyncio.get_running_loop().time() + (hard_stop - time.perf_counter()), stop)
    await asyncio.gather(*(worker(k, c) for k, c in enumerate(conns)))
    watchdog.cancel()
    res.elapsed_s = max(time.perf_counter() - t0, duration_s)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return res


async def _closed_loop(host: str, port: int, make: RequestFactory, duration_s: float,
                       connections: int) -> LoadResult:
    lat: list[float] = []
    res = LoadResult("closed", None, duration_s, connections, np.array([]), np.array([]),
                     np.array([]))
    conns = [await _connect(host, port) for _ in range(connections)]
    t0 = time.perf_counter()
    stop = t0 + duration_s
    counter = iter(range(1 << 62))
    stopping = False

    async def worker(conn: _Connection) -> None:
        while (sent := time.perf_counter()) < stop:
            try:
                status = await conn.request(make(next(counter), time.time()))
            except (ConnectionError, OSError):
                if not stopping:
                    res.errors += 1
                return
            lat.append(time.perf_counter() - sent)
            res.statuses[status] = res.statuses.get(status, 0) + 1

    def abort() -> None:  # answers still missing 5 s after the end are abandoned
        nonlocal stopping
        stopping = True
        for c in conns:
            if c.transport is not None:
                c.transport.abort()

    watchdog = asyncio.get_running_loop().call_later(duration_s + 5, abort)
    await asyncio.gather(*(worker(c) for c in conns))
    watchdog.cancel()
    res.elapsed_s = time.perf_counter() - t0
    res.latency = res.service = np.array(lat)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return res


def _run(coro: Any) -> LoadResult:
    """Run on uvloop when installed (less client overhead per request), else asyncio's loop.

    The caller's heap (a benchmark process holds pandas, Feast, its data) is frozen for the
    run: a full collection walked all of it and paused this client for 79 ms once, time that
    was counted as the server's latency.  The scorer freezes its start-up heap the same way.
    """
    gc.collect()
    gc.freeze()
    try:
        try:
            import uvloop
        except ImportError:
            result: LoadResult = asyncio.run(coro)
            return result
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(coro)
            return result
    finally:
        gc.unfreeze()


def open_loop(host: str, port: int, make: RequestFactory, rate: float, duration_s: float,
              connections: int = 32, drain_s: float = 5.0) -> LoadResult:
    """`rate * duration_s` requests at fixed arrival times; bounded by duration + drain."""
    _check_host(host)
    return _run(_open_loop(host, port, make, rate, duration_s, connections, drain_s))


def closed_loop(host: str, port: int, make: RequestFactory, duration_s: float,
                connections: int = 32) -> LoadResult:
    """As many requests as `connections` back-to-back senders complete in `duration_s`."""
    _check_host(host)
    return _run(_closed_loop(host, port, make, duration_s, connections))


# --- closed-loop peak throughput with wrk (C, so the client steals less CPU) ------------------

def wrk_available() -> bool:
    import shutil

    return shutil.which("wrk") is not None


def wrk_script(bodies: list[str], ts_lua: str, placeholder: str = "__TS__") -> str:
    """A wrk Lua script POSTing `bodies` round-robin with `placeholder` -> `ts_lua` (a Lua
    expression evaluated per request, e.g. the current time)."""
    quoted = ",\n".join(f"[==[{b}]==]" for b in bodies)
    return f"""
local bodies = {{
{quoted}
}}
local n = #bodies
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  local body = (string.gsub(bodies[(i % n) + 1], "{placeholder}", {ts_lua}))
  return wrk.format(nil, nil, nil, body)
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    throughput: float
    non_2xx: int
    socket_errors: str
    output: str

    def summary(self) -> dict[str, object]:
        return {"tool": "wrk", "requests": self.requests, "seconds": self.seconds,
                "throughput": self.throughput, "non_2xx": self.non_2xx,
                "socket_errors": self.socket_errors}


def wrk_closed_loop(host: str, port: int, path: str, script: str, duration_s: float,
                    connections: int, threads: int = 1) -> WrkResult:
    """Run wrk (closed loop) for `duration_s` seconds; bounded by a timeout."""
    import re
    import subprocess
    import tempfile

    _check_host(host)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{int(duration_s)}s",
            "--timeout", "10s", "-s", f.name, f"http://{host}:{port}{path}"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30,
                             check=True).stdout
    finally:
        import os

        os.unlink(f.name)
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)\b", out)
    if not m:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    seconds = float(m.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(3)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return WrkResult(int(m.group(1)), seconds, int(m.group(1)) / seconds,
                     int(non2xx.group(1)) if non2xx else 0, sock.group(1) if sock else "none",
                     out)


# --- calibration: the floor of what this client can resolve on this machine ------------------

_NULL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _NullProtocol(asyncio.Protocol):
    """Answers every HTTP/1.1 request with `{}` at once (keep-alive, Content-Length bodies)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n")[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[:end + 4 + length]
            self.transport.write(_NULL_RESPONSE)


async def _serve_null(port: int, seconds: float) -> None:
    server = await asyncio.get_running_loop().create_server(_NullProtocol, "127.0.0.1", port)
    async with server:
        await asyncio.sleep(seconds)


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.loadgen null-server --port P [--seconds S]` (calibration target)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("null-server", help="answer every request at once on 127.0.0.1")
    n.add_argument("--port", type=int, required=True)
    n.add_argument("--seconds", type=float, default=600.0, help="exit after this long")
    a = p.parse_args(argv)
    _run_plain(_serve_null(a.port, a.seconds))


def _run_plain(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


if __name__ == "__main__":
    main()
