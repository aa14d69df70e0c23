"""The model registry fails closed: two running scorers (hot reload on) keep serving the
verified champion whatever happens to registry.json, and never fall back to an artifact
directory that merely sits in the model directory.

Each scenario breaks the registry, waits until both scorers have *refused* a reload of it
(`fraud_model_reloads_total{outcome="refused"}` grows: the change was seen, not missed), then
checks that both still answer with the champion, `/ready` stays 200 and
`fraud_model_registry_ok` reads 0; the good registry is then put back and both recover.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from scoring.artifact import MODEL_FILE, sha256_file
from scoring.registry import Registry
from tests.integration.serving.test_lifecycle import _clone, _txn
from tests.integration.test_faults import serve
from tests.procs import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RELOAD_INTERVAL_S = 0.2


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


def _remove(reg: Registry) -> None:
    reg.path.unlink()


def _empty(reg: Registry) -> None:
    reg.path.write_text("")


def _champion_null(reg: Registry) -> None:
    state = json.loads(reg.path.read_text())
    reg.path.write_text(json.dumps({**state, "champion": None, "history": []}))


def _not_json(reg: Registry) -> None:
    reg.path.write_text("{not json")


def _tampered_artifact(reg: Registry) -> None:
    """Registered with the real model's hash, promoted in the history, then the file swapped:
    the registry points at an artifact that is not what it recorded."""
    state = json.loads(reg.path.read_text())
    entry = dict(state["versions"]["v1"], path="v3-tamper")
    state["versions"]["v3-tamper"] = entry
    state["history"].append({"at": "now", "action": "promote", "version": "v3-tamper",
                             "previous": "v1"})
    state["champion"] = "v3-tamper"
    with (reg.model_dir / "v3-tamper" / MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    reg.path.write_text(json.dumps(state))


def _champion_not_registered(reg: Registry) -> None:
    state = json.loads(reg.path.read_text())
    reg.path.write_text(json.dumps({**state, "champion": "v3-tamper"}))


SCENARIOS: dict[str, Callable[[Registry], None]] = {
    "removed": _remove,
    "emptied": _empty,
    "champion_null": _champion_null,
    "not_json": _not_json,
    "champion_not_registered": _champion_not_registered,
    "tampered_artifact": _tampered_artifact,
}


def test_both_scorers_keep_the_verified_champion_whatever_the_registry_says(
    tmp_path: Path, trained_artifact: Path
) -> None:
    d = tmp_path / "models"
    reg = Registry(d)
    reg.register(_clone(trained_artifact, d, "v1"))
    # an unregistered version that sorts last, consistent with its own metadata: the
    # "newest directory" an old fallback would have unpickled
    tamper = _clone(trained_artifact, d, "v3-tamper")
    assert json.loads((tamper / "metadata.json").read_text())["sha256"] == sha256_file(
        tamper / MODEL_FILE)
    good = reg.path.read_text()
    env = {"SERVING_MODEL_DIR": str(d), "SERVING_MODEL_VERSION": "",
           "SERVING_RELOAD_INTERVAL_S": str(RELOAD_INTERVAL_S)}
    with ExitStack() as stack:
        bases = [stack.enter_context(serve(env, tmp_path / f"scorer-{i}.log")) for i in range(2)]
        assert [_served_version(b) for b in bases] == ["v1", "v1"]
        for name, damage in SCENARIOS.items():
            before = [_refused(b) for b in bases]
            damage(reg)
            wait_for(f"both scorers to refuse the registry ({name})",
                     lambda before=before: all(_refused(b) > n
                                               for b, n in zip(bases, before, strict=True)), 60)
            for b in bases:
                assert _served_version(b) == "v1", name
                assert httpx.get(b + "/ready", timeout=5.0).status_code == 200, name
                assert _metric(b, "fraud_model_registry_ok") == 0.0, name
            # repaired: both reload the good registry
            reg.path.write_text(good)
            if (tamper / MODEL_FILE).stat().st_size != (trained_artifact / MODEL_FILE).stat().st_size:
                (tamper / MODEL_FILE).write_bytes((trained_artifact / MODEL_FILE).read_bytes())
            wait_for(f"both scorers to accept the repaired registry ({name})",
                     lambda: all(_metric(b, "fraud_model_registry_ok") == 1.0 for b in bases), 60)
        assert [_served_version(b) for b in bases] == ["v1", "v1"]
    assert not (tamper / "unpickled").exists()
    for i in range(2):
        log = (tmp_path / f"scorer-{i}.log").read_text()
        assert "model reload refused" in log and "v3-tamper" in log
