"""Model lifecycle: the registry and its CLI, shadow and canary challengers, reloads without a
restart (also under load), refusal of tampered artifacts, and the API keys.

Versions `v1` and `v2` are copies of the session's trained artifact (same model file, so the
sha256 stays valid; only `metadata.version` differs); `v3` is a small model of another feature
service, for a challenger with its own online features.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from scoring.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    save_artifact,
    service_feature_names,
    sha256_file,
)
from scoring.models import in_canary
from scoring.registry import REGISTRY_DB, Registry, RegistryError
from serving.app import create_app
from serving.config import ServingSettings
from tests.conftest import PROJECT
from tests.fixtures.model_registry import fresh_registry
from training.model import make_pipeline
from training.registry import main

pytestmark = pytest.mark.integration

ADMIN_KEY = "admin-secret"
ADMIN = {"X-API-Key": ADMIN_KEY}


def _clone(src: Path, model_dir: Path, version: str) -> Path:
    dst = model_dir / version
    shutil.copytree(src, dst)
    meta = json.loads((dst / METADATA_FILE).read_text())
    meta["version"] = version
    (dst / METADATA_FILE).write_text(json.dumps(meta))
    return dst


def _tamper(artifact: Path) -> None:
    with (artifact / MODEL_FILE).open("ab") as f:
        f.write(b"\0")


def _txn(tid: str, user: str = "u1") -> dict[str, Any]:
    return {"transaction_id": tid, "user_id": user, "merchant_id": "m1", "amount": 42.0,
            "currency": "EUR", "channel": "online"}


def _settings(model_dir: Path, **kw: Any) -> ServingSettings:
    base: dict[str, Any] = {"model_dir": model_dir, "admin_api_key": ADMIN_KEY, "api_key": None,
                            "model_version": None, "reload_interval_s": 0}
    return ServingSettings(**{**base, **kw})


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _cli(model_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training.registry", "--model-dir", str(model_dir), *args],
        cwd=PROJECT, capture_output=True, text=True, timeout=60,
    )


def _version(client: TestClient, user: str = "u1", **headers: str) -> str:
    r = client.post("/v1/score", json=_txn("t-1", user), headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


@pytest.fixture
def model_dir(tmp_path: Path, trained_artifact: Path) -> Path:
    """v1 (champion) and v2 registered in a private model directory."""
    d = tmp_path / "models"
    reg = fresh_registry(d)
    for v in ("v1", "v2"):
        reg.register(_clone(trained_artifact, d, v))
    return d


@pytest.fixture
def client(model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(model_dir))) as c:
        yield c


# --- the registry -----------------------------------------------------------------------


def test_cli_register_list_promote_rollback(
    tmp_path: Path, trained_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "models"
    fresh_registry(d)
    for v in ("v1", "v2"):
        _clone(trained_artifact, d, v)
    # the real entry point once (a subprocess costs seconds: Python, MLflow's client) ...
    assert _cli(d, "register", str(d / "v1")).stdout.strip() == "registered v1 (champion)"

    def cli(*args: str) -> str:  # ... then the same entry point, in-process
        main(["--model-dir", str(d), *args])
        return capsys.readouterr().out

    assert cli("register", str(d / "v2")).strip() == "registered v2 (-)"
    table = cli("list").splitlines()
    assert table[0].split()[:2] == ["VERSION", "ROLE"]
    assert [r.split()[:2] for r in table[1:]] == [["v1", "champion"], ["v2", "-"]]
    assert "champion: v2" in cli("promote", "v2")

    assert json.loads(cli("show"))["version"] == "v2"
    assert json.loads(cli("show", "v1"))["role"] == "-"
    cli("challenger", "v1", "--mode", "canary", "--share", "0.25")
    assert "canary 25%" in cli("list")
    cli("rollback")  # rolling back to the challenger clears it
    state = Registry(d).state()
    assert state["champion"] == "v1" and state["challenger"] is None
    assert state["lineage"] == ["v1"]
    for args, message in ((["rollback"], "no previous champion"),
                          (["promote", "v9"], "not registered"),
                          (["challenger", "v1"], "is the champion")):
        with pytest.raises(SystemExit):
            cli(*args)
        assert message in capsys.readouterr().err

    _tamper(d / "v2")
    with pytest.raises(SystemExit) as refused:
        cli("promote", "v2")
    assert refused.value.code == 1 and "sha256" in capsys.readouterr().err
    assert Registry(d).state()["champion"] == "v1"


def test_registry_concurrent_writers_lose_nothing(tmp_path: Path, trained_artifact: Path) -> None:
    d = tmp_path / "models"
    fresh_registry(d)
    dirs = [_clone(trained_artifact, d, f"v{i}") for i in range(12)]
    errors: list[BaseException] = []

    def register(p: Path) -> None:
        try:
            Registry(d).register(p)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(p,)) for p in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    state = Registry(d).state()
    assert sorted(state["versions"]) == sorted(p.name for p in dirs)
    assert state["lineage"] == [state["champion"]]  # exactly one first version became champion
    _tamper(dirs[0])  # same version, another (consistently hashed) model file
    meta = json.loads((dirs[0] / METADATA_FILE).read_text())
    meta["sha256"] = sha256_file(dirs[0] / MODEL_FILE)
    (dirs[0] / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="already registered"):
        Registry(d).register(dirs[0])  # versions are immutable


# --- what serves ------------------------------------------------------------------------


def test_serves_champion_and_honours_the_pin(model_dir: Path) -> None:
    Registry(model_dir).promote("v2")
    with TestClient(create_app(_settings(model_dir))) as c:
        assert _version(c) == "v2"
        assert _metric("fraud_model_info", version="v2", feature_service="fraud_model_v1") == 1
    with TestClient(create_app(_settings(model_dir, model_version="v1"))) as c:
        assert _version(c) == "v1"
        assert c.get("/admin/models", headers=ADMIN).json()["serving"]["source"] == "pinned"


def test_shadow_scores_same_vectors_and_never_answers(model_dir: Path) -> None:
    Registry(model_dir).set_challenger("v2", "shadow")
    before = _metric("fraud_shadow_scores_total", version="v2")
    lookups = _metric("fraud_online_lookup_seconds_count")
    diffs = _metric("fraud_challenger_score_diff_count", version="v2")
    with TestClient(create_app(_settings(model_dir))) as c:
        r = c.post("/v1/score/batch", json={"transactions": [_txn(f"t{i}", f"u{i}")
                                                             for i in range(5)]})
        assert r.status_code == 200
        assert {x["model_version"] for x in r.json()["results"]} == {"v1"}
        assert _metric("fraud_challenger_info", version="v2", feature_service="fraud_model_v1",
                       mode="shadow") == 1
    assert _metric("fraud_shadow_scores_total", version="v2") == before + 5
    assert _metric("fraud_challenger_score_diff_count", version="v2") == diffs + 5
    assert _metric("fraud_online_lookup_seconds_count") == lookups + 1  # one lookup, shared


def test_shadow_with_another_feature_service(model_dir: Path, materialized_store: Any) -> None:
    service = "fraud_model_v1_no_velocity"
    features = service_feature_names(materialized_store.get_feature_service(service))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, len(features))), rng.integers(0, 2, 400)
    small = make_pipeline(0).set_params(model__max_iter=10)
    save_artifact(model_dir / "v3", small.fit(x, y),
                  {"version": "v3", "feature_service": service, "features": features})
    reg = Registry(model_dir)
    reg.register(model_dir / "v3")
    reg.set_challenger("v3", "shadow")
    before = _metric("fraud_shadow_scores_total", version="v3")
    lookups = _metric("fraud_online_lookup_seconds_count")
    with TestClient(create_app(_settings(model_dir))) as c:
        assert _version(c) == "v1"
        models = c.app.state.models.current  # type: ignore[attr-defined]
        assert models.challenger.scorer.features is not models.champion.features
    assert _metric("fraud_shadow_scores_total", version="v3") == before + 1
    assert _metric("fraud_online_lookup_seconds_count") == lookups + 2  # its own lookup


def test_canary_is_deterministic_by_user(model_dir: Path) -> None:
    Registry(model_dir).set_challenger("v2", "canary", 0.5)
    users = [f"user-{i}" for i in range(200)]
    before = _metric("fraud_canary_requests_total", version="v2")
    with TestClient(create_app(_settings(model_dir))) as c:
        def versions(order: list[str]) -> dict[str, str]:
            body = {"transactions": [_txn(f"t-{u}", u) for u in order]}
            r = c.post("/v1/score/batch", json=body)
            assert r.status_code == 200
            return {u: x["model_version"] for u, x in zip(order, r.json()["results"], strict=True)}

        first = versions(users)
        assert versions(users[::-1]) == first  # same user, same model, whatever the batch
        assert all(_version(c, u) == first[u] for u in users[:10])
    assert set(first.values()) == {"v1", "v2"}
    assert first == {u: "v2" if in_canary(u, 0.5) else "v1" for u in users}
    assert 60 < sum(v == "v2" for v in first.values()) < 140
    canaried = sum(v == "v2" for v in first.values())
    assert _metric("fraud_canary_requests_total", version="v2") == before + 2 * canaried + sum(
        first[u] == "v2" for u in users[:10])


# --- reloading --------------------------------------------------------------------------


def test_admin_promote_rollback_and_models(client: TestClient, model_dir: Path) -> None:
    assert _version(client) == "v1"
    r = client.post("/admin/promote/v2", headers=ADMIN)
    assert r.status_code == 200 and r.json()["serving"]["champion"]["version"] == "v2"
    assert _version(client) == "v2"
    assert _metric("fraud_model_info", version="v2", feature_service="fraud_model_v1") == 1
    assert _metric("fraud_model_info", version="v1", feature_service="fraud_model_v1") == 0
    assert client.post("/admin/rollback", headers=ADMIN).status_code == 200
    assert _version(client) == "v1"
    r = client.post("/admin/rollback", headers=ADMIN)
    assert r.status_code == 409 and "no previous champion" in r.json()["detail"]
    assert client.post("/admin/promote/v9", headers=ADMIN).status_code == 404
    status = client.get("/admin/models", headers=ADMIN).json()
    assert status["serving"]["champion"]["version"] == "v1"
    assert status["registry"]["champion"] == "v1"
    assert sorted(status["registry"]["versions"]) == ["v1", "v2"]


def test_drift_follows_the_champion(model_dir: Path) -> None:
    """After a promotion the PSI is taken against the new champion's training reference (a
    fresh window), and a rollback returns to the old one; the old gauges do not linger."""
    d = model_dir
    # v2's reference puts all of `txn_amount_log` in its lowest bin: the same traffic drifts
    ref = json.loads((d / "v2" / "reference.json").read_text())
    amount = ref["features"]["txn_amount_log"]
    # traffic: amounts spread evenly over the training deciles of log1p(amount)
    cuts = [amount["edges"][0] - 0.2, *amount["edges"], amount["edges"][-1] + 0.2]
    amounts = [round(float(np.expm1((lo + hi) / 2)), 2)
               for lo, hi in zip(cuts, cuts[1:], strict=False)]
    amount["proportions"] = [1.0] + [0.0] * (len(amount["proportions"]) - 1)
    amount["missing"] = 0.0
    (d / "v2" / "reference.json").write_text(json.dumps(ref))

    def psi_after_traffic(client: TestClient, tag: str) -> dict[str, float]:
        for i in range(120):
            r = client.post("/v1/score", json={**_txn(f"{tag}-{i}", f"u{i % 7}"),
                                               "amount": amounts[i % len(amounts)]})
            assert r.status_code == 200, r.text
        plog = client.app.state.service.prediction_log  # type: ignore[attr-defined]
        assert len(plog.drift._recent) == 120  # the window restarted with the swap
        return dict(plog.drift.compute())

    with TestClient(create_app(_settings(d, drift_interval_seconds=3600))) as c:
        before = psi_after_traffic(c, "a")
        assert before["txn_amount_log"] < 1.0
        assert c.post("/admin/promote/v2", headers=ADMIN).status_code == 200
        plog = c.app.state.service.prediction_log  # type: ignore[attr-defined]
        assert plog.drift_source == d / "v2"
        assert _metric("fraud_feature_psi", feature="txn_amount_log") == 0.0  # old gauge gone
        promoted = psi_after_traffic(c, "b")
        assert promoted["txn_amount_log"] > before["txn_amount_log"] + 1.0
        assert c.post("/admin/rollback", headers=ADMIN).status_code == 200
        assert psi_after_traffic(c, "c")["txn_amount_log"] == pytest.approx(
            before["txn_amount_log"], abs=0.5)


def test_tampered_artifact_is_refused_and_old_model_keeps_serving(
    client: TestClient, model_dir: Path
) -> None:
    _tamper(model_dir / "v2")
    r = client.post("/admin/promote/v2", headers=ADMIN)
    assert r.status_code == 409 and "sha256" in r.json()["detail"]
    assert Registry(model_dir).state()["champion"] == "v1"
    assert _version(client) == "v1"


def test_reload_refuses_a_registry_state_that_cannot_serve(
    client: TestClient, model_dir: Path, trained_artifact: Path
) -> None:
    Registry(model_dir).promote("v2")  # valid when promoted elsewhere ...
    _tamper(model_dir / "v2")  # ... but the file this replica reads is corrupt
    r = client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409 and "sha256" in r.json()["detail"]
    assert _version(client) == "v1"
    assert "sha256" in client.get("/admin/models", headers=ADMIN).json()["last_error"]
    shutil.copy(trained_artifact / MODEL_FILE, model_dir / "v2" / MODEL_FILE)  # repaired
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200
    assert _version(client) == "v2"


def test_poller_follows_the_registry_and_survives_a_broken_file(model_dir: Path) -> None:
    registry = model_dir / REGISTRY_DB
    good = registry.read_bytes()

    def wait_for(version: str, c: TestClient) -> None:
        deadline = time.monotonic() + 10
        while _version(c) != version:
            assert time.monotonic() < deadline, f"still not serving {version}"
            time.sleep(0.05)

    with TestClient(create_app(_settings(model_dir, reload_interval_s=0.1))) as c:
        with registry.open("r+b") as f:  # in place: the scorer's open connection reads it
            f.write(b"not an SQLite database" * 64)
        deadline = time.monotonic() + 10
        while not c.get("/admin/models", headers=ADMIN).json()["last_error"]:
            assert time.monotonic() < deadline, "broken registry not noticed"
            time.sleep(0.05)
        assert _version(c) == "v1"
        registry.write_bytes(good)
        Registry(model_dir).promote("v2")
        wait_for("v2", c)
        Registry(model_dir).rollback()
        wait_for("v1", c)


def test_reload_while_requests_are_in_flight(model_dir: Path) -> None:
    app = create_app(_settings(model_dir))

    async def scenario() -> list[tuple[int, str]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://scorer") as c:
                stop = asyncio.Event()

                async def fire(k: int) -> list[tuple[int, str]]:
                    out = []
                    i = 0
                    while not stop.is_set():
                        r = await c.post("/v1/score/batch", json={"transactions": [
                            _txn(f"{k}-{i}-{j}", f"u{(i + j) % 50}") for j in range(5)]})
                        versions = {x["model_version"] for x in r.json().get("results", [])}
                        out.append((r.status_code, ",".join(sorted(versions))))
                        i += 1
                    return out

                tasks = [asyncio.create_task(fire(k)) for k in range(8)]
                for target in ("v2", "v1", "v2", "v1"):
                    await asyncio.sleep(0.05)
                    r = await c.post(f"/admin/promote/{target}", headers=ADMIN)
                    assert r.status_code == 200, r.text
                await asyncio.sleep(0.05)
                stop.set()
                return [x for t in await asyncio.gather(*tasks) for x in t]

    results = asyncio.run(scenario())
    assert len(results) > 40
    assert {status for status, _ in results} == {200}
    assert {v for _, v in results} == {"v1", "v2"}  # each batch answered by one model set


# --- API keys ---------------------------------------------------------------------------


def test_admin_routes_need_the_admin_key(model_dir: Path) -> None:
    with TestClient(create_app(_settings(model_dir, admin_api_key=None))) as c:
        r = c.get("/admin/models", headers=ADMIN)
        assert r.status_code == 403 and r.json()["detail"].startswith("admin API disabled")
    with TestClient(create_app(_settings(model_dir))) as c:
        for path, method in (("/admin/models", "GET"), ("/admin/reload", "POST"),
                             ("/admin/promote/v2", "POST"), ("/admin/rollback", "POST")):
            assert c.request(method, path).status_code == 403
            assert c.request(method, path, headers={"X-API-Key": "wrong"}).status_code == 403
        assert c.get("/admin/models", headers=ADMIN).status_code == 200
        assert _version(c) == "v1"  # nothing was promoted by the refused calls


def test_scoring_needs_the_api_key_when_set(model_dir: Path) -> None:
    with TestClient(create_app(_settings(model_dir, api_key="score-secret"))) as c:
        assert c.post("/v1/score", json=_txn("t1")).status_code == 401
        r = c.post("/v1/score", json=_txn("t1"), headers={"X-API-Key": "nope"})
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers
        assert c.post("/v1/score/batch", json={"transactions": [_txn("t1")]}).status_code == 401
        assert _version(c, **{"X-API-Key": "score-secret"}) == "v1"
        assert c.get("/health").status_code == 200
