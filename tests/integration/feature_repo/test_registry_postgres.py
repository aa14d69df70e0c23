"""The Feast registry on PostgreSQL (what docker-compose.yml runs), end to end: `feast apply`,
`feast materialize` and the scorer, each a real process with `FEAST_REGISTRY_URL` pointing at
PostgreSQL instead of the session's SQLite registry.

The PostgreSQL server is `FRAUD_TEST_POSTGRES_URL` (default
`postgresql+psycopg://postgres@127.0.0.1:5432/test`); the test skips, saying so, only when no
server answers there.  The Feast project name is fixed (`fraud`, feature_store.yaml), so the
test creates a database of its own, `fraud_test_<random>`, for the registry tables and drops it
afterwards: concurrent runs never share registry rows.  The online store is a private
redis-server, so the session's Redis is not written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from scoring.registry import Registry
from tests.conftest import SIM_END
from tests.integration.serving.test_api import known, log_tx  # noqa: F401 - fixtures: a user with every feature
from tests.procs import clone_artifact, redis_server, serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[3]
FEAST = str(Path(sys.executable).parent / "feast")
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
END = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)


def _conninfo(sqlalchemy_url: str, database: str | None = None) -> str:
    url = make_url(sqlalchemy_url)
    if database is not None:
        url = url.set(database=database)
    return str(url.set(drivername="postgresql").render_as_string(hide_password=False))


@pytest.fixture
def registry_url() -> Iterator[str]:
    """A SQLAlchemy URL of a fresh PostgreSQL database, dropped afterwards."""
    server = os.environ.get("FRAUD_TEST_POSTGRES_URL", DEFAULT_URL)
    name = f"fraud_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(_conninfo(server), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL answers at {make_url(server)!r} (FRAUD_TEST_POSTGRES_URL): "
                    f"{str(exc).strip().splitlines()[0]}")
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield str(make_url(server).set(database=name).render_as_string(hide_password=False))
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def run(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(args, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_apply_materialize_and_score_with_the_registry_on_postgresql(
    registry_url: str, trained_artifact: Path, known: dict[str, Any],  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    with redis_server(tmp_path / "redis.log") as redis_url:
        env = {**os.environ, "FEAST_REGISTRY_URL": registry_url, "REDIS_URL": redis_url,
               "FEAST_USAGE": "False"}
        run(env, FEAST, "-c", "feature_repo", "apply")
        run(env, FEAST, "-c", "feature_repo", "materialize",
            "2000-01-01T00:00:00", END.strftime("%Y-%m-%dT%H:%M:%S"))

        # the registry lives in this database: Feast's tables, our project's objects
        with psycopg.connect(_conninfo(registry_url)) as conn:
            views = {row[0] for row in conn.execute(
                "SELECT feature_view_name FROM feature_views WHERE project_id = 'fraud'")}
            services = {row[0] for row in conn.execute(
                "SELECT feature_service_name FROM feature_services WHERE project_id = 'fraud'")}
        assert {"user_profile_fv", "merchant_profile_fv", "user_velocity_fv"} <= views
        assert "fraud_model_v1" in services
        listed = run(env, FEAST, "-c", "feature_repo", "feature-services", "list")
        assert "fraud_model_v1" in listed

        # the scorer resolves the model's feature service through PostgreSQL and finds every
        # feature materialized into the private Redis
        model_dir = tmp_path / "models"
        Registry(model_dir).register(clone_artifact(trained_artifact, model_dir, "pg-a"))
        body = {"transaction_id": "pg-1", "user_id": known["user_id"],
                "merchant_id": known["merchant_id"], "amount": 42.5, "currency": "EUR",
                "channel": "online", "event_timestamp": (END + timedelta(hours=1)).isoformat()}
        scorer_env = {"FEAST_REGISTRY_URL": registry_url, "REDIS_URL": redis_url,
                      "SERVING_MODEL_DIR": str(model_dir), "SERVING_RELOAD_INTERVAL_S": "0"}
        with serve(scorer_env, tmp_path / "scorer.log") as (base, _):
            resp = httpx.post(base + "/v1/score", json=body, timeout=30.0)
            ready = httpx.get(base + "/ready", timeout=10.0)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["model_version"] == "pg-a"
        assert out["feature_service"] == "fraud_model_v1"
        assert out["missing_features"] == [], json.dumps(out)
        assert ready.status_code == 200, ready.text
