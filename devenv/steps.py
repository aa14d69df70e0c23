"""Console steps of `make demo`: numbered steps, commands run with their output and time,
background processes stopped with their process group, and a wait for an HTTP endpoint."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from feature_repo.config import PROJECT_DIR

STEP = 0


def step(msg: str) -> None:
    global STEP
    STEP += 1
    print(f"\n[{STEP}] {msg}", flush=True)


def run(*cmd: str, quiet: bool = False) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=PROJECT_DIR, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"demo step failed: {' '.join(cmd)}")
    out = "\n".join(
        line for line in proc.stdout.splitlines() if "Warning" not in line and line.strip()
    )
    if not quiet and out:
        print("    " + out.replace("\n", "\n    "))
    print(f"    ({time.perf_counter() - t0:.1f}s)", flush=True)
    return proc.stdout


@contextlib.contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=PROJECT_DIR, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit(f"{url} did not become ready in {timeout:.0f}s")
