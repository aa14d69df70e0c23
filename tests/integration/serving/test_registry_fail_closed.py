"""Two running scorers (hot reload on) sharing one MLflow model registry.

Fail closed: whatever happens to the registry, both keep serving the verified champion and
never fall back to an artifact directory that merely sits in the model directory.  Each
scenario breaks the registry, waits until both scorers have *refused* a reload of it
(`fraud_model_reloads_total{outcome="refused"}` grows: the change was seen, not missed), then
checks that both still answer with the champion, `/ready` stays 200 and
`fraud_model_registry_ok` reads 0; the good registry is then put back and both recover.

Shared: a promotion made with MLflow's own API (no CLI, no admin call) reaches both scorers
through their pollers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from scoring.artifact import MODEL_FILE, sha256_file
from scoring.registry import MODEL_NAME, REGISTRY_DB, Registry
from tests.fixtures.model_registry import fresh_registry
from tests.integration.serving.test_lifecycle import _clone, _txn
from tests.procs import serve, wait_for

if TYPE_CHECKING:  # MLflow is imported by scoring.registry, after its telemetry default
    from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RELOAD_INTERVAL_S = 0.2


@dataclass
class Pair:
    reg: Registry
    bases: list[str]
    logs: list[Path]
    trained: Path

    @property
    def mlflow(self) -> MlflowClient:
        """MLflow's own client (`mlflow.MlflowClient`) on the scorers' registry: what an
        operator or the UI uses."""
        return self.reg.client()

    def number(self, version: str) -> str:
        return str(self.reg.state()["versions"][version]["mlflow_version"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, trained_artifact: Path) -> Iterator[Pair]:
    """Two scorer processes on one registry whose champion is `v1`."""
    tmp = tmp_path_factory.mktemp("two-scorers")
    d = tmp / "models"
    reg = fresh_registry(d)
    reg.register(_clone(trained_artifact, d, "v1"))
    env = {"SERVING_MODEL_DIR": str(d), "SERVING_MODEL_VERSION": "",
           "SERVING_RELOAD_INTERVAL_S": str(RELOAD_INTERVAL_S)}
    logs = [tmp / f"scorer-{i}.log" for i in range(2)]
    with ExitStack() as stack:
        bases = [stack.enter_context(serve(env, log))[0] for log in logs]
        yield Pair(reg, bases, logs, trained_artifact)


def _metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(base + "/metrics", timeout=5.0).text
    m = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _refused(base: str) -> float:
    return _metric(base, "fraud_model_reloads_total", '{outcome="refused"}')


def _served_version(base: str) -> str:
    r = httpx.post(base + "/v1/score", json=_txn("fc-1"), timeout=10.0)
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def _db(p: Pair) -> Path:
    return p.reg.model_dir / REGISTRY_DB


def _removed(p: Pair) -> None:
    _db(p).rename(_db(p).with_suffix(".moved"))


def _not_a_database(p: Pair) -> None:
    with _db(p).open("r+b") as f:  # in place: the scorers' open connections read it too
        f.write(b"this is not an SQLite database" * 64)


def _emptied(p: Pair) -> None:
    """Truncated to nothing in place: SQLite opens a zero-byte file as a database without
    tables."""
    with _db(p).open("wb"):
        pass


def _champion_alias_deleted(p: Pair) -> None:
    p.mlflow.delete_registered_model_alias(MODEL_NAME, "champion")


def _champion_without_hash(p: Pair) -> None:
    """A version registered through MLflow by hand (no sha256, no path) made champion."""
    bare = p.mlflow.create_model_version(MODEL_NAME, (p.reg.model_dir / "v1").as_uri())
    p.mlflow.set_registered_model_alias(MODEL_NAME, "champion", str(bare.version))


def _tampered_artifact(p: Pair) -> None:
    """Registered with the real model's hash, made champion, then the file swapped: the
    registry points at an artifact that is not what it recorded."""
    tags = {**p.mlflow.get_model_version(MODEL_NAME, p.number("v1")).tags,
            "artifact_version": "v3-tamper", "path": "v3-tamper"}
    mv = p.mlflow.create_model_version(MODEL_NAME, (p.reg.model_dir / "v3-tamper").as_uri(),
                                       tags=tags)
    with (p.reg.model_dir / "v3-tamper" / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    p.mlflow.set_registered_model_alias(MODEL_NAME, "champion", str(mv.version))


SCENARIOS: dict[str, Callable[[Pair], None]] = {
    "removed": _removed,
    "not_a_database": _not_a_database,
    "emptied": _emptied,
    "champion_alias_deleted": _champion_alias_deleted,
    "champion_without_hash": _champion_without_hash,
    "tampered_artifact": _tampered_artifact,
}


def test_both_scorers_keep_the_verified_champion_whatever_the_registry_says(pair: Pair) -> None:
    d, bases = pair.reg.model_dir, pair.bases
    # an unregistered version that sorts last, consistent with its own metadata: the
    # "newest directory" an old fallback would have unpickled
    tamper = _clone(pair.trained, d, "v3-tamper")
    assert sha256_file(tamper / MODEL_FILE) == sha256_file(pair.trained / MODEL_FILE)
    good = _db(pair).read_bytes()
    assert [_served_version(b) for b in bases] == ["v1", "v1"]
    for name, damage in SCENARIOS.items():
        before = [_refused(b) for b in bases]
        damage(pair)
        wait_for(f"both scorers to refuse the registry ({name})",
                 lambda before=before: all(_refused(b) > n
                                           for b, n in zip(bases, before, strict=True)), 60)
        for b in bases:
            assert _served_version(b) == "v1", name
            assert httpx.get(b + "/ready", timeout=5.0).status_code == 200, name
            assert _metric(b, "fraud_model_registry_ok") == 0.0, name
        # repaired: both reload the good registry
        _db(pair).with_suffix(".moved").unlink(missing_ok=True)
        _db(pair).write_bytes(good)
        (tamper / MODEL_FILE).write_bytes((pair.trained / MODEL_FILE).read_bytes())
        wait_for(f"both scorers to accept the repaired registry ({name})",
                 lambda: all(_metric(b, "fraud_model_registry_ok") == 1.0 for b in bases), 60)
    assert [_served_version(b) for b in bases] == ["v1", "v1"]
    assert not (tamper / "unpickled").exists()
    for log in pair.logs:
        text = log.read_text()
        assert "model reload refused" in text and "v3-tamper" in text
        assert "no recorded path and sha256" in text and "does not exist" in text


def test_a_promotion_through_mlflow_reaches_both_scorers(pair: Pair) -> None:
    """MLflow's own API, not ours: set the `champion` alias; both scorers follow it within a
    few reload intervals (the bound is generous for a loaded machine), then follow it back."""
    pair.reg.register(_clone(pair.trained, pair.reg.model_dir, "v2"))
    assert [_served_version(b) for b in pair.bases] == ["v1", "v1"]
    for target in ("v2", "v1"):
        start = time.monotonic()
        pair.mlflow.set_registered_model_alias(MODEL_NAME, "champion", pair.number(target))
        wait_for(f"both scorers to serve {target}",
                 lambda target=target: all(_served_version(b) == target for b in pair.bases), 30)
        took = time.monotonic() - start
        for b in pair.bases:
            info = re.findall(r'^fraud_model_info\{[^}]*version="([^"]+)"[^}]*\} 1\.0$',
                              httpx.get(b + "/metrics", timeout=5.0).text, re.M)
            assert info == [target], info
        print(f"champion {target} served by both scorers {took:.1f} s after the alias moved")
    assert pair.reg.state()["champion"] == "v1"
