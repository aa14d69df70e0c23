"""Where the feature repository finds its data and registry, from the environment.

Feast expands `${VAR}` in feature_store.yaml but has no defaults, so every entry point calls
`apply_env_defaults()` before opening the store; the Makefile exports the same defaults for the
`feast` CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

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


def redis_connection_string(url: str) -> str:
    """Translate a `redis://[:password@]host:port/db` URL into Feast's `host:port,db=N` form."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"REDIS_URL must start with redis:// or rediss://, got {url!r}")
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or 6379
    db = (parsed.path or "/0").lstrip("/") or "0"
    parts = [f"{host}:{port}", f"db={int(db)}"]
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.username and parsed.username != "default":
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)
