"""The thin path for plain scoring requests (`serving.lane`) answers as FastAPI's path does.

The lane takes `POST /v1/score[/batch]` with `Content-Type: application/json`, no query string
and a body that validates; a content type with a parameter (`; charset=utf-8`) goes through
FastAPI's own handler, so the same request sent both ways compares the two paths.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
from fastapi import Depends
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serving.app import create_app
from serving.config import ServingSettings
from serving.deps import get_models, require_api_key
from serving.routes.scoring import check_lane
from serving.schemas import BatchIn, TransactionIn
from tests.integration.serving.test_fuzz import CORPUS, VALID, _settings

pytestmark = pytest.mark.integration

LANE = {"content-type": "application/json"}
FASTAPI = {"content-type": "application/json; charset=utf-8"}  # not the lane's: FastAPI's path


@pytest.fixture(scope="module")
def client(trained_artifact: Path, materialized_store: Any) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(trained_artifact)), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def fastapi_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per request that FastAPI's route handler solved (the lane solves none)."""
    calls: list[int] = []
    solve = fastapi.routing.solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return calls


def _both(client: TestClient, path: str, body: bytes) -> tuple[Any, Any]:
    return (client.post(path, content=body, headers=LANE),
            client.post(path, content=body, headers=FASTAPI))


def _same(lane: Any, full: Any) -> None:
    assert lane.status_code == full.status_code, (lane.text, full.text)
    assert lane.json() == full.json()
    for name in ("content-type", "retry-after", "x-request-id"):
        assert (name in lane.headers) == (name in full.headers), name


def test_a_valid_request_takes_the_lane_and_gets_fastapis_answer(
        client: TestClient, fastapi_calls: list[int]) -> None:
    now = datetime.now(UTC).isoformat()
    one = json.dumps({**VALID, "event_timestamp": now}).encode()
    lane, full = _both(client, "/v1/score", one)
    assert lane.status_code == 200 and fastapi_calls == [1]  # only the second one
    _same(lane, full)
    batch = json.dumps({"transactions": [{**VALID, "transaction_id": f"l-{i}",
                                          "event_timestamp": now} for i in range(3)]}).encode()
    _same(*_both(client, "/v1/score/batch", batch))
    assert fastapi_calls == [1, 1]


@pytest.mark.parametrize("body", [
    {**VALID, "event_timestamp": "2099-01-01T00:00:00Z"},  # 422 future, from the service
    {"transactions": [VALID, {**VALID, "event_timestamp": "2099-01-01T00:00:00Z"}]},
])
def test_refusals_after_validation_are_the_apps_handlers(client: TestClient,
                                                          body: dict[str, Any]) -> None:
    path = "/v1/score/batch" if "transactions" in body else "/v1/score"
    lane, full = _both(client, path, json.dumps(body).encode())
    assert lane.status_code == 422
    _same(lane, full)


@pytest.mark.parametrize("name", [n for n, c in CORPUS.items() if c.body])
def test_an_invalid_body_gets_fastapis_own_refusal(client: TestClient, name: str) -> None:
    case = CORPUS[name]
    if case.status == 413:
        pytest.skip("refused by the body cap before either path")
    _same(*_both(client, case.path, case.body or b""))


EXTRA_BODIES = [
    b'\xef\xbb\xbf' + json.dumps(VALID).encode(),  # a BOM: json.loads takes it, the lane not
    json.dumps({**VALID, "amount": 5}).encode(),
    json.dumps({**VALID, "amount": True}).encode(),
    json.dumps({**VALID, "amount": "5"}).encode(),
    (json.dumps(VALID)[:-1] + ', "amount": 7}').encode(),  # a duplicate key: the last wins
    (json.dumps(VALID)[:-1] + ', "amount": "x"}').encode(),
    json.dumps({**VALID, "event_timestamp": None}).encode(),
    json.dumps({**VALID, "event_timestamp": "1700000000"}).encode(),
    json.dumps({**VALID, "event_timestamp": "2026-01-01 00:00:00+01:00"}).encode(),
    json.dumps({**VALID, "event_timestamp": "2026-01-01"}).encode(),
    json.dumps({**VALID, "user_id": "caf\u00e9"}, ensure_ascii=False).encode(),
    json.dumps(VALID).encode() + b"  \n",
    json.dumps(VALID).encode() + b"x",
    json.dumps({**VALID, "amount": 12345678901234567890}).encode(),
    json.dumps({**VALID, "amount": -0.0}).encode(),
]


@pytest.mark.parametrize("body", [*(c.body for c in CORPUS.values() if c.body), *EXTRA_BODIES])
def test_the_lane_validates_no_body_that_fastapi_refuses(body: bytes) -> None:
    """What the lane validates (pydantic-core's JSON parser) FastAPI validates too (json.loads,
    then the model), as the same values: a body is never taken by one and refused by the
    other.  (The lane hands every body it refuses to FastAPI.)"""
    for model in (TransactionIn, BatchIn):
        try:
            fast = model.model_validate_json(body)
        except ValueError:
            continue
        assert model.model_validate(json.loads(body)) == fast


def test_the_lane_checks_the_api_key(trained_artifact: Path, materialized_store: Any) -> None:
    body = json.dumps({**VALID, "event_timestamp": datetime.now(UTC).isoformat()}).encode()
    settings = _settings(trained_artifact).model_copy(update={"api_key": SecretStr("k")})
    with TestClient(create_app(settings)) as c:
        for headers in (LANE, FASTAPI):
            r = c.post("/v1/score", content=body, headers=headers)
            assert r.status_code == 401 and "WWW-Authenticate" in r.headers
            assert c.post("/v1/score", content=body,
                          headers={**headers, "X-API-Key": "k"}).status_code == 200


def test_a_query_string_takes_fastapis_path(client: TestClient, fastapi_calls: list[int]
                                             ) -> None:
    at = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    r = client.post("/v1/score?explain=true", content=json.dumps(
        {**VALID, "event_timestamp": at}).encode(), headers=LANE)
    assert r.status_code == 200 and r.json()["features"] is not None and fastapi_calls == [1]


def test_dependency_overrides_take_fastapis_path(client: TestClient, fastapi_calls: list[int]
                                                 ) -> None:
    """FastAPI resolves overridden dependencies; the lane, which calls them directly, steps
    aside while there are any."""
    app: Any = client.app
    body = json.dumps({**VALID, "event_timestamp": datetime.now(UTC).isoformat()}).encode()
    app.dependency_overrides[get_models] = get_models
    try:
        assert client.post("/v1/score", content=body, headers=LANE).status_code == 200
    finally:
        app.dependency_overrides.clear()
    assert fastapi_calls == [1]
    assert client.post("/v1/score", content=body, headers=LANE).status_code == 200
    assert fastapi_calls == [1]


def test_a_scoring_dependency_the_lane_does_not_call_stops_the_app_at_build(
        tmp_path: Path) -> None:
    """A dependency added to the scoring routes (here where the app includes their router)
    would run through FastAPI and be skipped by the lane: `check_lane` refuses it, and so
    `create_app` would."""

    def audit() -> None:  # a new check someone adds to the scoring routes
        return None

    for key in (None, SecretStr("k")):  # the app as built, keyed or not: nothing unknown
        create_app(ServingSettings(model_dir=tmp_path, api_key=key))
    check_lane([Depends(require_api_key)])
    with pytest.raises(RuntimeError, match="serving.lane does not call"):
        check_lane([Depends(require_api_key), Depends(audit)])
