"""Child processes of the benchmarks: own session, bounded in time, always stopped.

Every child is started with `start_new_session=True`, so stopping it signals its whole process
group (a server's workers, a broker's helpers) by the id we started, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from devenv.localproc import free_port
from feature_repo.config import PROJECT_DIR

__all__ = ["BenchError", "Child", "PeakTree", "free_port", "log_tail", "python", "run_capture",
           "run_json", "run_step", "running", "tree_cpu_seconds", "tree_rss_kib", "wait_http"]


class BenchError(RuntimeError):
    """A benchmark could not be run (set-up failed, a child died or timed out).

    `detail` holds what was seen at the time, e.g. the child's Python stack when it was killed.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def stack_of(pid: int) -> str:
    """The Python stack of a live process (py-spy dump), or '' without py-spy."""
    from bench.profile import py_spy

    exe = py_spy()
    if exe is None:
        return ""
    try:
        out = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "\n".join(out.splitlines()[:40])


def python(*args: str) -> list[str]:
    """`python <args>` with the interpreter running the benchmark (the venv's)."""
    return [sys.executable, *args]


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """One child process with its output appended to `log_path`."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path):
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} is not started")
        return self.proc.pid

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, cwd=PROJECT_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The exit status once the child has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after `timeout_s`. Idempotent."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # the group we created: the child and its workers
            try:
                proc.wait(wait_s)
                if sig == signal.SIGTERM:
                    # workers may outlive their parent for a moment
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                return
            except subprocess.TimeoutExpired:
                continue


@contextlib.contextmanager
def running(
    name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path
) -> Iterator[Child]:
    """Start a child for the duration of the block; it is stopped in `finally`."""
    child = Child(name, argv, env, log_path).start()
    try:
        yield child
    finally:
        child.stop()


def wait_http(url: str, child: Child, timeout_s: float) -> None:
    """Block until GET `url` answers 200; fail fast if `child` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited during start-up:\n{log_tail(child.log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise BenchError(f"{child.name} not ready at {url} within {timeout_s:.0f}s:\n"
                     f"{log_tail(child.log_path)}")


def run_capture(name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
                timeout_s: float) -> str:
    """Run a child to completion (killed after `timeout_s`); return its stdout.

    Its stderr, and then its stdout, are appended to `log_path`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        child = Child(name, argv, env, log_path)
        child.proc = subprocess.Popen(list(argv), cwd=PROJECT_DIR, env=dict(env),
                                      stdout=subprocess.PIPE, stderr=log,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        proc = child.proc
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{name} did not finish within {timeout_s:.0f}s (killed)",
                             stack_of(proc.pid)) from exc
        finally:
            child.stop(timeout_s=5)
        log.write(out)
    if proc.returncode:
        raise BenchError(f"{name} failed (exit {proc.returncode}):\n{log_tail(log_path)}")
    return out.decode(errors="replace")


def run_json(
    name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, timeout_s: float
) -> dict[str, Any]:
    """Run a child to completion (killed after `timeout_s`); return the JSON of its last line.

    The child writes its diagnostics to stderr and one JSON object as the last line of stdout.
    """
    text = run_capture(name, argv, env, log_path, timeout_s).strip()
    try:
        result: dict[str, Any] = json.loads(text.splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise BenchError(f"{name} printed no JSON result:\n{text[-2000:]}") from exc
    return result


def run_step(name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
             timeout_s: float) -> float:
    """Run a preparation step to completion; return its wall time in seconds."""
    t0 = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        child = Child(name, argv, env, log_path)
        child.proc = subprocess.Popen(list(argv), cwd=PROJECT_DIR, env=dict(env), stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        try:
            rc = child.proc.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{name} did not finish within {timeout_s:.0f}s (killed)") from exc
        finally:
            child.stop(timeout_s=5)
    if rc:
        raise BenchError(f"{name} failed (exit {rc}):\n{log_tail(log_path)}")
    return time.perf_counter() - t0


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` and its descendants (0 when it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def tree_rss_kib(pid: int) -> int:
    """Resident memory of process `pid` and all its descendants (KiB), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")),
                              0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total


class PeakTree:
    """Samples this process tree's RSS every 0.1 s in a daemon thread; `stop()` returns the
    peak in MiB (`peak_kib` is the peak so far).

    With `cap_mib`, a tree over it kills this process (SIGKILL, after a line on stderr), so a
    size the machine cannot hold fails alone instead of pushing a shared host into the OOM
    killer.
    """

    def __init__(self, cap_mib: float | None = None) -> None:
        self.peak_kib = 0
        self._cap_kib = None if cap_mib is None else cap_mib * 1024
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_kib = max(self.peak_kib, tree_rss_kib(os.getpid()))
            if self._cap_kib is not None and self.peak_kib > self._cap_kib:
                print(f"process tree at {self.peak_kib / 1024:,.0f} MiB, over the cap of "
                      f"{self._cap_kib / 1024:,.0f} MiB: stopped", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, tree_rss_kib(os.getpid()))
        return self.peak_kib / 1024
