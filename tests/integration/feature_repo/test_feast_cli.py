"""The raw `feast` CLI on the feature repo: what a user types in their first hour.

* without the environment the Makefile exports, it fails with one clear line, no traceback;
* `feast -c feature_repo ui` starts (it needs Feast's `grpcio` extra) and serves its page.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[3]
FEAST = str(Path(sys.executable).parent / "feast")
UI_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", [["registry-dump"], ["feature-views", "list"]])
def test_cli_without_environment_fails_in_one_line(command: list[str]) -> None:
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()),
                 "FEAST_USAGE": "False"}
    result = subprocess.run(
        [FEAST, "-c", "feature_repo", *command], cwd=PROJECT, env=clean_env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "SQLAlchemy" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: FEAST_REGISTRY_URL is not set"), lines[0]


@pytest.mark.integration
@pytest.mark.slow
def test_feast_ui_serves_its_page(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    log = (tmp_path / "feast-ui.log").open("w")
    proc = subprocess.Popen(
        [FEAST, "-c", "feature_repo", "ui", "--host", "127.0.0.1", "--port", str(port)],
        cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    status = response.status
                    body = response.read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        if status is None:
            proc.kill()
            proc.wait(timeout=10)
            output = (tmp_path / "feast-ui.log").read_text()
            pytest.fail(f"feast ui did not answer within {UI_START_TIMEOUT_S} s:\n{output}")
        assert status == 200
        assert b"<html" in body.lower()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
