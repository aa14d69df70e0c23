"""Where the feature repository finds its data and registry, from the environment.

Feast expands `${VAR}` in feature_store.yaml but has no defaults, so every entry point calls
`apply_env_defaults()` before opening the store; the Makefile exports the same defaults for the
`feast` CLI.  A bare `feast` command without them stops on `require_env` with one line naming
the variable (not SQLAlchemy's traceback for the unexpanded `${FEAST_REGISTRY_URL}`).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import click

REPO_DIR = Path(__file__).resolve().parent
PROJECT_DIR = REPO_DIR.parent

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def data_dir() -> Path:
    """Root of the offline data (transaction log, labels, feature history): `FRAUD_DATA_DIR`."""
    return Path(os.environ.get("FRAUD_DATA_DIR", PROJECT_DIR / "data")).resolve()


def apply_env_defaults() -> None:
    """Set the environment variables feature_store.yaml expands, where they are unset."""
    os.environ.setdefault("FRAUD_DATA_DIR", str(data_dir()))
    os.environ.setdefault("FEAST_REGISTRY_URL", f"sqlite:///{data_dir() / 'registry.db'}")
    os.environ.setdefault("REDIS_URL", DEFAULT_REDIS_URL)


class MissingEnvironmentError(click.ClickException):
    """A variable feature_store.yaml expands is unset.

    A `ClickException`, so the `feast` CLI prints it as one `Error: ...` line and exits 1.
    """


def require_env(names: list[str]) -> None:
    """Raise `MissingEnvironmentError` naming the first of `names` that is unset or empty."""
    for name in names:
        if not os.environ.get(name):
            raise MissingEnvironmentError(
                f"{name} is not set, and feature_store.yaml needs it. Use the Makefile "
                "(make apply, make materialize), or export the defaults first: export "
                "FRAUD_DATA_DIR=$PWD/data FEAST_REGISTRY_URL=sqlite:///$PWD/data/registry.db"
            )


REDIS_MODES = ("standalone", "cluster")


def redis_mode() -> str:
    """`REDIS_MODE`: `standalone` (one Redis node, the default) or `cluster` (Redis Cluster,
    `REDIS_URL` naming any seed node).  ValueError, naming the variable, for anything else."""
    mode = os.environ.get("REDIS_MODE", "").strip().lower() or "standalone"
    if mode not in REDIS_MODES:
        raise ValueError(f"REDIS_MODE must be one of {', '.join(REDIS_MODES)}, got {mode!r}")
    return mode


def redis_connection_string(url: str, *, cluster: bool = False) -> str:
    """Translate a `redis://[user:password@]host:port/db` URL into Feast's connection string:
    `host:port,db=N,...` for one node; for a cluster (`cluster`) `host:port,...` without a
    database, as Feast's `redis_type: redis_cluster` expects (a cluster has database 0 only,
    so a URL naming another one is a ValueError)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"REDIS_URL must start with redis:// or rediss://, got {url!r}")
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or 6379
    db = int((parsed.path or "/0").lstrip("/") or "0")
    parts = [f"{host}:{port}"]
    if not cluster:
        parts.append(f"db={db}")
    elif db != 0:
        raise ValueError(f"REDIS_URL names database {db}, but a Redis Cluster has only "
                         f"database 0 (REDIS_MODE=cluster): {url!r}")
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.username and parsed.username != "default":
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)
