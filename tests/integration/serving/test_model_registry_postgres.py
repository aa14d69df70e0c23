"""The MLflow model registry on PostgreSQL (what docker-compose.yml runs), end to end: the CLI
registers and promotes, the scorer serves the champion, follows a promotion made with MLflow's
own API through its poller, and writes promotions and rollbacks from `/admin` into PostgreSQL.

The server is `FRAUD_TEST_POSTGRES_URL` (default `postgresql+psycopg://postgres@127.0.0.1:5432/
test`); the test skips, saying so, only when no server answers there.  It creates a database of
its own, `fraud_mlflow_<random>` (MLflow migrates its schema into it at first use), and drops it
afterwards.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from scoring.registry import MODEL_NAME, Registry
from serving.app import create_app
from tests.integration.serving.test_lifecycle import ADMIN, _clone, _settings, _version
from training.registry import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def registry_url() -> Iterator[str]:
    """A SQLAlchemy URL of a fresh PostgreSQL database, dropped afterwards."""
    server = make_url(os.environ.get("FRAUD_TEST_POSTGRES_URL", DEFAULT_URL))
    name = f"fraud_mlflow_{uuid.uuid4().hex[:12]}"
    conninfo = server.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL answers at {server!r} (FRAUD_TEST_POSTGRES_URL): "
                    f"{str(exc).strip().splitlines()[0]}")
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_registry_on_postgres_cli_scorer_and_mlflow_api(
    tmp_path: Path, trained_artifact: Path, registry_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = tmp_path / "models"
    for v in ("pg-1", "pg-2"):
        _clone(trained_artifact, d, v)

    def cli(*args: str) -> str:
        main(["--model-dir", str(d), "--registry-url", registry_url, *args])
        return capsys.readouterr().out

    assert cli("register", str(d / "pg-1")).strip() == "registered pg-1 (champion)"
    assert cli("register", str(d / "pg-2")).strip() == "registered pg-2 (-)"
    assert not (d / "mlflow.db").exists(), "nothing written next to the artifacts"
    reg = Registry(d, registry_url)
    mlflow = reg.client()  # MLflow's own client (mlflow.MlflowClient) on the same database
    number = {v: str(e["mlflow_version"]) for v, e in reg.state()["versions"].items()}

    settings = _settings(d, model_registry_url=registry_url, reload_interval_s=0.1)
    with TestClient(create_app(settings)) as c:
        assert _version(c) == "pg-1"
        # MLflow's own API: the poller follows the alias
        mlflow.set_registered_model_alias(MODEL_NAME, "champion", number["pg-2"])
        deadline = time.monotonic() + 30
        while _version(c) != "pg-2":
            assert time.monotonic() < deadline, "the alias set through MLflow was not followed"
            time.sleep(0.1)
        # the admin API writes into PostgreSQL: rollback returns to the champion before the
        # one MLflow promoted, then a promotion again
        r = c.post("/admin/rollback", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert _version(c) == "pg-1"
        assert mlflow.get_model_version_by_alias(MODEL_NAME, "champion").version == int(
            number["pg-1"])
        r = c.post("/admin/promote/pg-2", headers=ADMIN)
        assert r.status_code == 200 and r.json()["serving"]["champion"]["version"] == "pg-2"
        status = c.get("/admin/models", headers=ADMIN).json()
        assert status["registry"]["champion"] == "pg-2"
        assert status["registry"]["url"].startswith("postgresql+psycopg://")
    assert reg.state()["lineage"] == ["pg-1", "pg-2"]
    assert "champion" in cli("list").splitlines()[2]
