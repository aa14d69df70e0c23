"""Connecting to the model registry: MLflow's client for a registry URL, and the URL's forms.

`MODEL_REGISTRY_URL` is a SQLAlchemy URL (`sqlite:///...` on one box, `postgresql+psycopg://...`
for a fleet) or an MLflow server's `http(s)://` address.  A database registry is probed with a
short timeout before MLflow opens it, so a registry that does not answer fails fast; messages
name a URL without its password (`redacted`).  What the registry holds, and the rules for
changing it, are `scoring.registry`'s.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from mlflow import MlflowClient

CONNECT_TIMEOUT_S = 5  # a PostgreSQL registry that does not answer fails fast, not after minutes
_POOLCLASS = "MLFLOW_SQLALCHEMYSTORE_POOLCLASS"


def redacted(url: str) -> str:
    """`url` without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL (an MLflow server's http address)
        return url.split("@")[-1]


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite registry URL, else None."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - http(s)://: an MLflow server
        return None
    return Path(parsed.database or "") if parsed.get_backend_name() == "sqlite" else None


def with_connect_timeout(url: str) -> str:
    """A PostgreSQL URL with `connect_timeout` (CONNECT_TIMEOUT_S) unless it sets one."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        return url
    if parsed.get_backend_name() != "postgresql" or "connect_timeout" in parsed.query:
        return url
    with_timeout = parsed.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_S)})
    return with_timeout.render_as_string(hide_password=False)


@lru_cache(maxsize=8)
def mlflow_client(url: str) -> MlflowClient:
    """One MLflow client per registry URL and process, created at first use (start-up).

    A database registry is probed first with a short timeout: MLflow's own engine creation
    retries for about 100 s, too long for a start-up that must refuse, or a poll.
    """
    # A scorer does not report usage to anyone (MLflow sends telemetry unless told not to).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient  # 1-2 s: imported with the first registry call, not per call

    if url.startswith(("http://", "https://")):
        return MlflowClient(tracking_uri=url, registry_uri=url)
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()
    if sqlite_file(url) is None:
        return MlflowClient(tracking_uri=url, registry_uri=url)
    # SQLite: a connection per query (MLflow's engines are created with the pool class its
    # variable names, read while the stores are created below), so a registry file that is
    # replaced, restored from a backup say, is read, not the old file a pooled connection holds.
    previous = os.environ.get(_POOLCLASS)
    os.environ[_POOLCLASS] = "NullPool"
    try:
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        client.search_registered_models(max_results=1)  # creates the registry store now
    finally:
        if previous is None:
            os.environ.pop(_POOLCLASS, None)
        else:
            os.environ[_POOLCLASS] = previous
    return client
