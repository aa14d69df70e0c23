"""Real processes for integration tests: the scorer (`python -m serving`) and a private
`redis-server`, each on a free loopback port and stopped by the process handle it started.

Kept apart from the test modules (whose imports reach the stream code), so a scorer test needs
only the scorer.  `tests/integration/test_faults.py` has older twins of `serve`, `clone_artifact` and
`RedisServer`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis

from devenv.localproc import free_port
from scoring.artifact import METADATA_FILE

PROJECT = Path(__file__).resolve().parents[1]
START_S = 120.0  # Python + Feast registry + model: ~8 s here, much more on a busy machine
T = TypeVar("T")


def wait_for(what: str, fn: Callable[[], T | None], bound_s: float = 30.0) -> T:
    """Poll `fn` until it returns something truthy; fail naming `what` after `bound_s`."""
    deadline = time.monotonic() + bound_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {bound_s} s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def serve(settings: dict[str, str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m serving` with `settings` on top of this environment; yields its base URL and
    process once /health answers, and stops it (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving", "--port", str(port)], cwd=PROJECT,
            env={**os.environ, **settings}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the scorer exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the scorer did not start in {START_S} s:\n"
                                     f"{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def clone_artifact(src: Path, model_dir: Path, version: str) -> Path:
    """A copy of the model artifact `src` under another version."""
    dst = Path(shutil.copytree(src, model_dir / version))
    meta = json.loads((dst / METADATA_FILE).read_text())
    (dst / METADATA_FILE).write_text(json.dumps({**meta, "version": version}))
    return dst


@contextmanager
def redis_server(log_path: Path, *options: str) -> Iterator[str]:
    """A private `redis-server` without persistence (and `options`, e.g. "--rename-command",
    "EVALSHA", ""); yields its URL (skips without the binary)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", *options], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        wait_for("redis-server to answer", lambda: _pings(client), 15)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
