"""Test session set-up: an isolated data directory, registry and Redis.

`pytest_configure` sets the environment before any test module is collected, so nothing imports
the feature repo (whose data paths Feast reads from `FRAUD_DATA_DIR` when it imports
`definitions.py`) before then, and tests never touch the demo's data.  Each session starts its
own `redis-server` on a free loopback port (so concurrent sessions cannot flush each other's
data); without the binary it falls back to database 15 of the Redis at `REDIS_URL`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.broker", "tests.fixtures.redis_cluster"]

_ROOT: Path | None = None
_REDIS_PROC: subprocess.Popen[bytes] | None = None

PROJECT = Path(__file__).resolve().parents[1]
# Far enough in the past that every TTL edge the tests build (velocity TTL: 30 days) is too.
SIM_END = date(2026, 9, 1)
SIM_ARGS = ["--users", "300", "--days", "21", "--seed", "11", "--end", SIM_END.isoformat()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module is collected (and imports the feature repo, which reads its data
    paths when Feast imports it): a private data directory, registry, model and recovery
    directories, and a private `redis-server`."""
    global _ROOT, _REDIS_PROC
    if _ROOT is not None:
        return
    _ROOT = Path(tempfile.mkdtemp(prefix="fraudstream-tests-"))
    os.environ["FRAUD_DATA_DIR"] = str(_ROOT / "data")
    os.environ["FEAST_REGISTRY_URL"] = f"sqlite:///{_ROOT / 'registry.db'}"
    os.environ["TRAINING_MODEL_DIR"] = str(_ROOT / "models")
    os.environ["STREAMING_RECOVERY_DIR"] = str(_ROOT / "recovery")
    binary = shutil.which("redis-server")
    if binary is None:  # database 15 of the Redis at REDIS_URL
        base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
        os.environ["REDIS_URL"] = f"{base}/15"
        return
    port = _free_port()
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    _REDIS_PROC = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(_ROOT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ is marked `integration` (real Redis, broker, Feast);
    tests/unit/ is fast and hermetic (`make test-fast`)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _REDIS_PROC is not None:
        _REDIS_PROC.terminate()
        _REDIS_PROC.wait(10)
    if _ROOT is not None:
        shutil.rmtree(_ROOT, ignore_errors=True)


def run_module(module: str, *args: str) -> str:
    """Run `python -m module args` in the test environment; fail the test on error."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=PROJECT, capture_output=True, text=True,
        timeout=600,
    )
    if proc.returncode:
        raise AssertionError(f"{module} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="session")
def data_root() -> Path:
    return Path(os.environ["FRAUD_DATA_DIR"])


@pytest.fixture(scope="session")
def redis_client():  # type: ignore[no-untyped-def]
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def feature_data(data_root: Path) -> Path:
    """Simulated log, batch profiles and velocity backfill for a small population."""
    run_module("training.simulate", *SIM_ARGS)
    run_module("training.batch_features")
    run_module("streaming.backfill")
    return data_root


@pytest.fixture(scope="session")
def store(feature_data: Path, redis_client):  # type: ignore[no-untyped-def]
    """A FeatureStore with the repo applied to the test registry."""
    subprocess.run(
        [str(Path(sys.executable).parent / "feast"), "-c", "feature_repo", "apply"],
        cwd=PROJECT, check=True, capture_output=True, timeout=300,
    )
    from training.retrieval import open_store

    return open_store()


@pytest.fixture(scope="session")
def materialized_store(store):  # type: ignore[no-untyped-def]
    """The store after `feast materialize` up to the end of the simulated log."""
    from datetime import UTC, datetime

    end = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
    store.materialize(start_date=datetime(2000, 1, 1, tzinfo=UTC), end_date=end)
    return store


@pytest.fixture(scope="session")
def trained_artifact(materialized_store) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A model artifact trained on the test data (the real training job)."""
    run_module("training.train")
    model_dir = Path(os.environ["TRAINING_MODEL_DIR"])
    yield sorted(p for p in model_dir.iterdir() if p.is_dir())[-1]
