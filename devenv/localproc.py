"""Local process and port helpers shared by the broker wrapper and `devenv.services`.

These only ever touch 127.0.0.1 ports and processes whose pid this project recorded; nothing
here looks processes up by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel reports free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port (no protocol check)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def spawn(argv: Sequence[str], log_path: Path | None, *, detach: bool) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log_path` (discarded when None).

    With `detach=True` the child gets its own session, so it survives the calling command and
    the terminal's Ctrl-C; otherwise it shares the caller's process group and dies with it.
    """
    if log_path is None:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=detach,
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie waiting to be reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def pid_matches(pid: int, needle: str) -> bool:
    """Whether the command line of live process `pid` contains `needle` (guards pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return pid_alive(pid)  # no procfs: cannot tell, assume it is ours
    return needle in cmdline


def stop_pid(pid: int, timeout_s: float = 10.0) -> bool:
    """SIGTERM `pid`, wait up to `timeout_s`, then SIGKILL; True if it is gone afterwards."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    return not pid_alive(pid)


def _reap(pid: int) -> None:
    """Collect `pid` if it is our own exited child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def read_pid(path: Path) -> int | None:
    """The pid recorded in `path`, or None when the file is missing or unreadable."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """`host:port` (first entry of a comma-separated list, optional scheme) as a pair."""
    first = address.split(",")[0].strip()
    first = first.split("://", 1)[-1]
    host, sep, port = first.rpartition(":")
    if not sep:
        return first, default_port
    return host.strip("[]") or "127.0.0.1", int(port)
