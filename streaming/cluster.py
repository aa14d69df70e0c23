"""N dataflow processes on one host, restarted together: `python -m streaming.features -p N`.

A Bytewax cluster is a fixed set of processes that connect to each other (`-i k -a
"host0:port;host1:port;..."`, one process id per address).  It cannot lose a member: when one
process dies the others stop too (their connections to it break; Bytewax 0.21 panics with
"Send thread panic"), and the cluster can only be run again as a whole, resuming from the last
snapshot every process committed to the recovery partitions.  `LocalCluster` does that on one
host: it starts the N processes of a cluster on free loopback ports, and when any of them
exits it stops the rest and starts all N again (backing off while they keep failing).  Across
hosts, run one `python -m streaming.features -i k -a ...` per host under a supervisor of your
own (systemd, Kubernetes) that restarts the whole set the same way (docs/scaling.md).

Process k serves /metrics and /ready on `STREAMING_METRICS_PORT` + k.  The children die with
the supervisor (Linux parent-death signal), so a killed supervisor leaves no orphan that would
hold a port or a recovery partition.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL when the supervisor stops
PEER_EXIT_S = 5.0  # how long the survivors get to exit by themselves after one died
POLL_S = 0.2


def parse_addresses(text: str) -> list[str]:
    """`"host0:port;host1:port"` (Bytewax's `-a`) as a list; a clear error for a bad entry."""
    out = [a.strip() for a in text.split(";") if a.strip()]
    if not out:
        raise ValueError("--addresses lists no process (expected 'host0:port;host1:port;...')")
    for a in out:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--addresses entry {a!r} is not host:port")
    return out


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports the kernel reports free right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the supervisor dies (Linux; elsewhere no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class LocalCluster:
    """Runs `processes` copies of `module` as one Bytewax cluster and restarts it as a whole.

    `module` gets `--process-id k --addresses <all>` and the environment `env` plus
    `STREAMING_METRICS_PORT` = `metrics_port` + k (0 stays 0: no metrics server).  Restarts
    back off from `backoff_s` doubling to `max_backoff_s`; after `restart_limit` consecutive
    runs that lasted less than `healthy_s`, the supervisor gives up (exit status 1).  When
    one process exits, the others get `peer_exit_s` to stop by themselves before SIGKILL.
    """

    processes: int
    module: str = "streaming.features"
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    metrics_port: int = 0
    host: str = "127.0.0.1"
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    healthy_s: float = 60.0
    restart_limit: int = 10
    peer_exit_s: float = PEER_EXIT_S
    stop_grace_s: float = STOP_GRACE_S
    on_start: Callable[[list[subprocess.Popen[bytes]]], None] | None = None
    _stop: bool = False
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError(f"processes must be at least 1, not {self.processes}")

    def argv(self, process_id: int, addresses: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", self.module, "--process-id", str(process_id),
                "--addresses", ";".join(addresses)]

    def run(self) -> int:
        """Run until every process exits 0 (an input that ends), the supervisor is asked to
        stop (SIGTERM/SIGINT: exit 0), or the restart limit is hit (exit 1)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:
            self._stop_children(signal.SIGTERM, self.stop_grace_s)
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("supervisor: %s, stopping the cluster", signal.Signals(signum).name)
        self._stop = True

    def _loop(self) -> int:
        quick_failures, backoff = 0, self.backoff_s
        generation = 0
        while not self._stop:
            generation += 1
            started = time.monotonic()
            self._start(generation)
            first = self._wait_first_exit()
            if first is None:  # asked to stop
                return 0
            index, code = first
            if code == 0:
                rest = self._wait_all(timeout_s=None)
                if all(c == 0 for c in rest):
                    log.info("supervisor: every process finished")
                    return 0
            log.warning("supervisor: process %d (pid %d) exited with %s; stopping the others "
                        "and restarting the cluster (run %d)", index, self._children[index].pid,
                        _describe(code), generation)
            self._wait_all(timeout_s=self.peer_exit_s)
            self._stop_children(signal.SIGKILL, 5.0)
            ran_s = time.monotonic() - started
            if ran_s >= self.healthy_s:
                quick_failures, backoff = 0, self.backoff_s
            else:
                quick_failures += 1
                if quick_failures > self.restart_limit:
                    log.error("supervisor: the cluster failed %d times in a row within %.0f s "
                              "of starting; giving up", quick_failures, self.healthy_s)
                    return 1
            self._sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
        return 0

    def _start(self, generation: int) -> None:
        addresses = [f"{self.host}:{p}" for p in free_ports(self.processes, self.host)]
        self._children = []
        for k in range(self.processes):
            env = {**self.env, "STREAMING_METRICS_PORT":
                   str(self.metrics_port + k if self.metrics_port else 0)}
            self._children.append(subprocess.Popen(
                self.argv(k, addresses), env=env, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent))  # noqa: PLW1509 - the supervisor has no threads
        log.info("supervisor: cluster run %d: %d processes (pids %s) on %s", generation,
                 self.processes, ", ".join(str(c.pid) for c in self._children),
                 ";".join(addresses))
        if self.on_start is not None:
            self.on_start(self._children)

    def _wait_first_exit(self) -> tuple[int, int] | None:
        while not self._stop:
            for i, child in enumerate(self._children):
                code = child.poll()
                if code is not None:
                    return i, code
            time.sleep(POLL_S)
        return None

    def _wait_all(self, timeout_s: float | None) -> list[int | None]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stop:
            codes = [c.poll() for c in self._children]
            if all(code is not None for code in codes):
                return codes
            if deadline is not None and time.monotonic() > deadline:
                return codes
            time.sleep(POLL_S)
        return [c.poll() for c in self._children]

    def _stop_children(self, sig: signal.Signals, grace_s: float) -> None:
        for child in self._children:
            if child.poll() is None:
                child.send_signal(sig)
        deadline = time.monotonic() + grace_s
        for child in self._children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop and time.monotonic() < deadline:
            time.sleep(POLL_S)


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def parse_args(argv: list[str] | None, default_processes: int) -> argparse.Namespace:
    """The command line of `python -m streaming.features`: `processes` (local, default
    `default_processes`), or `process_id` and `addresses` (a list) of a cluster across hosts;
    inconsistent options exit with status 2 and a message (argparse)."""
    p = argparse.ArgumentParser(
        prog="python -m streaming.features",
        description="The live feature dataflow: Kafka transactions -> Redis + offline history.")
    p.add_argument("-p", "--processes", type=int, default=None,
                   help=f"dataflow processes on this host, supervised and restarted together "
                        f"(default STREAMING_PROCESSES, {default_processes})")
    p.add_argument("-i", "--process-id", type=int, default=None,
                   help="this process's index in --addresses (a cluster across hosts)")
    p.add_argument("-a", "--addresses", default=None,
                   help="every process of the cluster as 'host0:port;host1:port;...' "
                        "(the same list for each process)")
    a = p.parse_args(argv)
    if (a.process_id is None) != (a.addresses is None):
        p.error("--process-id and --addresses go together")
    if a.addresses is not None:
        if a.processes is not None:
            p.error("--processes runs a local cluster; with --addresses each process is "
                    "started on its own")
        try:
            a.addresses = parse_addresses(a.addresses)
        except ValueError as exc:
            p.error(str(exc))
        if not 0 <= a.process_id < len(a.addresses):
            p.error(f"--process-id {a.process_id} is not an index of the "
                    f"{len(a.addresses)} --addresses")
    elif a.processes is None:
        a.processes = default_processes
    if a.processes is not None and a.processes < 1:
        p.error("--processes must be at least 1")
    return a
