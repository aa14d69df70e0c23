"""Explanations online equal explanations offline, for the trained model and real features.

Cases: labelled transactions of the log's last day (frauds first), re-timed to just after
SIM_END, when Redis holds exactly what a point-in-time row of that time is built from (see
test_skew.py, which checks the features themselves), plus an unknown user.  Online:
`POST /v1/score?explain=true` and `POST /v1/score/batch?explain=true`; offline:
`training.explain.explain_transactions` (the training frame + `scoring.explain`).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from scoring.artifact import Artifact, load_artifact
from serving.app import create_app
from serving.config import ServingSettings
from tests.conftest import PROJECT, SIM_END
from tests.integration.scoring.test_skew import streamed_users
from training.explain import explain_transactions
from training.retrieval import labelled_entity_frame, read_transactions

pytestmark = pytest.mark.integration

END = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
T_S = END + timedelta(minutes=45)


@pytest.fixture(scope="module")
def artifact(trained_artifact: Path) -> Artifact:
    return load_artifact(trained_artifact)


@pytest.fixture(scope="module")
def cases(feature_data: Path) -> pd.DataFrame:
    streamed = streamed_users(feature_data)
    labelled = labelled_entity_frame(feature_data)
    labelled = labelled[~labelled["user_id"].isin(streamed)]
    last_day = labelled[labelled["event_timestamp"] >= pd.Timestamp(END - timedelta(days=1))]
    sample = pd.concat([last_day[last_day["is_fraud"] == 1].head(4),
                        last_day[last_day["is_fraud"] == 0].sample(8, random_state=5)])
    rows = [{"transaction_id": f"explain-{i}", "user_id": r.user_id,
             "merchant_id": r.merchant_id, "amount": float(r.txn_amount), "currency": "EUR",
             "channel": r.txn_channel, "event_timestamp": T_S + timedelta(seconds=i)}
            for i, r in enumerate(sample.itertuples())]
    rows.append({"transaction_id": "explain-unknown", "user_id": "u-explain-unknown",
                 "merchant_id": sample.iloc[0]["merchant_id"], "amount": 640.0,
                 "currency": "EUR", "channel": "online", "event_timestamp": T_S})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def offline(materialized_store: Any, artifact: Artifact, cases: pd.DataFrame
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame, contributions = explain_transactions(materialized_store, artifact, cases)
    assert list(frame["transaction_id"]) == list(cases["transaction_id"])
    return frame, contributions


@pytest.fixture(scope="module")
def client(trained_artifact: Path) -> Iterator[TestClient]:
    settings = ServingSettings(model_dir=trained_artifact.parent,
                               model_version=trained_artifact.name)
    with TestClient(create_app(settings)) as c:
        yield c


def wire(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "event_timestamp": r["event_timestamp"].isoformat()}


@pytest.fixture(scope="module")
def online_single(client: TestClient, cases: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for r in cases.to_dict("records"):
        resp = client.post("/v1/score?explain=true", json=wire(r))
        assert resp.status_code == 200, resp.text
        out.append(resp.json())
    return out


@pytest.fixture(scope="module")
def online_batch(client: TestClient, cases: pd.DataFrame) -> list[dict[str, Any]]:
    body = {"transactions": [wire(r) for r in cases.to_dict("records")]}
    resp = client.post("/v1/score/batch?explain=true", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", ["single", "batch"])
def test_api_contributions_equal_the_offline_computation(
    path: str, request: pytest.FixtureRequest, artifact: Artifact,
    offline: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    online = request.getfixturevalue(f"online_{path}")
    frame, contributions = offline
    for out, (_, row), (_, c) in zip(online, frame.iterrows(), contributions.iterrows(),
                                     strict=True):
        tid = out["transaction_id"]
        assert tid == row["transaction_id"]
        assert out["explanation"]["base_value"] == c["base_value"]
        for f in artifact.features:
            value = out["features"][f]["value"]
            assert (value is None and pd.isna(row[f])) or value == pytest.approx(row[f], rel=1e-12), \
                f"{tid} {f}: feature skew online={value!r} offline={row[f]!r}"
            assert out["explanation"]["contributions"][f] == c[f], (tid, f)
        assert list(out["explanation"]["contributions"]) == artifact.features


def test_contributions_add_up_to_the_score(artifact: Artifact,
                                           online_single: list[dict[str, Any]],
                                           offline: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    for out in online_single:
        total = out["explanation"]["base_value"] + math.fsum(
            out["explanation"]["contributions"].values())
        assert total == pytest.approx(math.log(out["score"] / (1 - out["score"])), abs=1e-9)
    frame, contributions = offline
    margin = artifact.model.decision_function(frame[artifact.features].to_numpy("float64"))
    sums = contributions["base_value"] + contributions[artifact.features].sum(axis=1)
    np.testing.assert_allclose(sums.to_numpy(), margin, rtol=0, atol=1e-9)
    np.testing.assert_allclose(contributions["margin"].to_numpy(), margin, rtol=0, atol=1e-9)


def test_reasons_are_the_largest_contributions(online_single: list[dict[str, Any]]) -> None:
    for out in online_single:
        e, features = out["explanation"], out["features"]
        assert (e["method"], e["units"]) == ("tree_shap", "log_odds")
        reasons = e["reasons"]
        assert 1 <= len(reasons) <= 5
        ranked = sorted((abs(c) for c in e["contributions"].values()), reverse=True)
        assert [abs(r["contribution"]) for r in reasons] == ranked[:len(reasons)]
        for r in reasons:
            assert r["contribution"] == e["contributions"][r["feature"]]
            assert r["direction"] == ("raises" if r["contribution"] > 0 else "lowers")
            assert r["value"] == features[r["feature"]]["value"] or (
                r["value"] is None and features[r["feature"]]["value"] is None)
    # not vacuous: the riskiest case sits above the base value, and what raised it is named
    riskiest = max(online_single, key=lambda o: o["score"])
    safest = min(online_single, key=lambda o: o["score"])
    for out, direction in ((riskiest, "raises"), (safest, "lowers")):
        base = out["explanation"]["base_value"]
        margin = math.log(out["score"] / (1 - out["score"]))
        assert (margin > base) == (direction == "raises"), (out["transaction_id"], margin, base)
        assert any(r["direction"] == direction for r in out["explanation"]["reasons"])


def test_explain_changes_nothing_else(client: TestClient, cases: pd.DataFrame,
                                      online_single: list[dict[str, Any]]) -> None:
    for r, explained in zip(cases.to_dict("records"), online_single, strict=True):
        plain = client.post("/v1/score", json=wire(r)).json()
        assert plain["explanation"] is None and plain["features"] is None
        assert {k: plain[k] for k in ("score", "decision", "model_version")} == \
            {k: explained[k] for k in ("score", "decision", "model_version")}


def test_openapi_documents_the_explanation(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    comp = schema["components"]["schemas"]
    assert "explanation" in comp["ScoreOut"]["properties"]
    assert set(comp["Explanation"]["properties"]) == {"method", "units", "base_value",
                                                       "contributions", "reasons"}
    assert set(comp["Reason"]["properties"]) == {"feature", "value", "contribution", "direction"}
    assert comp["Reason"]["properties"]["direction"]["enum"] == ["raises", "lowers"]
    assert set(comp["FeatureValue"]["properties"]) == {"value", "age_seconds"}  # unchanged
    params = schema["paths"]["/v1/score"]["post"]["parameters"]
    assert "contribution" in next(p for p in params if p["name"] == "explain")["description"]


def test_the_cli_explains_logged_transactions(feature_data: Path, trained_artifact: Path,
                                              materialized_store: Any, tmp_path: Path) -> None:
    log = read_transactions(feature_data)
    tid = str(log.iloc[-1]["transaction_id"])
    out = tmp_path / "explained.parquet"
    cmd = [sys.executable, "-m", "training.explain", tid, "--model", str(trained_artifact),
           "--top", "3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{tid} (user " in proc.stdout and "top reasons" in proc.stdout
    written = pd.read_parquet(out)
    assert list(written["transaction_id"]) == [tid]
    features = load_artifact(trained_artifact).features
    assert written.loc[0, "margin"] == pytest.approx(
        written.loc[0, "base_value"] + written.loc[0, features].sum(), abs=1e-9)
    bad = subprocess.run([sys.executable, "-m", "training.explain", "no-such-txn", "--model",
                          str(trained_artifact)], cwd=PROJECT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "not in the transaction log: no-such-txn" in bad.stderr
