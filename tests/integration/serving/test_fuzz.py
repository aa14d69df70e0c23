"""Hostile input against the scorer's HTTP API, in-process, with the real lifespan.

Two layers, one promise ("never a 5xx; every rejection a 4xx JSON error naming the field"):

* property-based fuzzing of every operation from the app's own OpenAPI schema (schemathesis):
  no 5xx, and every response conforms to the schema the app publishes;
* a hand-written hostile corpus: non-finite and huge numbers as raw JSON text, bodies over the
  size cap with and without Content-Length (streamed, and an endless chunked upload to a real
  server), deeply nested JSON, wrong content types, invalid UTF-8, unknown fields, timestamps
  far in the past and future, empty / null / array bodies and an oversized batch.

The app serves a copy of the session's trained artifact under its own version (so its
`fraud_model_info` series stays apart from other modules' apps) and reads the session's Redis.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from scoring.registry import Registry
from serving.app import create_app
from serving.config import ServingSettings

pytestmark = pytest.mark.integration

MAX_BODY = 1_000_000  # ServingSettings.max_body_bytes
VALID = {"transaction_id": "fz-1", "user_id": "fz-user", "merchant_id": "fz-shop",
         "amount": 12.5, "currency": "EUR", "channel": "online"}


def _settings(artifact: Path) -> ServingSettings:
    return ServingSettings(model_dir=artifact.parent, model_version=artifact.name,
                           reload_interval_s=0, max_body_bytes=MAX_BODY)


@pytest.fixture(scope="module")
def fuzz_artifact(trained_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained artifact under version `fuzz` (the hash covers model.joblib only)."""
    artifact = Path(shutil.copytree(trained_artifact, tmp_path_factory.mktemp("fuzz") / "fuzz"))
    meta = json.loads((artifact / "metadata.json").read_text())
    (artifact / "metadata.json").write_text(json.dumps({**meta, "version": "fuzz"}))
    Registry(artifact.parent).register(artifact)  # the scorer serves registered versions only
    return artifact


@pytest.fixture(scope="module")
def client(fuzz_artifact: Path, materialized_store: Any) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(fuzz_artifact)), raise_server_exceptions=False) as c:
        yield c


# --- property-based: the OpenAPI schema -----------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(fuzz_artifact: Path, materialized_store: Any) -> Iterator[Any]:
    """The app's own /openapi.json; schemathesis runs the app's lifespan itself."""
    from schemathesis.python import asgi

    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(_settings(fuzz_artifact)))
    asgi.shutdown_lifespans()


# (operation label, generation mode) -> examples; the scoring routes get most of the budget.
# Negative mode (inputs the schema forbids) only where there is a body to break: a header or
# path string cannot violate a `string` schema.
BUDGET = {
    ("POST /v1/score", GenerationMode.POSITIVE): 100,
    ("POST /v1/score", GenerationMode.NEGATIVE): 60,
    ("POST /v1/score/batch", GenerationMode.POSITIVE): 40,
    ("POST /v1/score/batch", GenerationMode.NEGATIVE): 40,
    **{(label, GenerationMode.POSITIVE): 10 for label in (
        "GET /health", "GET /ready", "GET /metrics", "GET /admin/models", "POST /admin/reload",
        "POST /admin/promote/{version}", "POST /admin/rollback")},
}
CHECKS = None  # every check schemathesis has (`--checks all`): status codes, headers, schemas ...


@pytest.mark.parametrize(("label", "mode"), list(BUDGET))
def test_every_operation_conforms_to_its_schema_and_never_fails(
    api_schema: Any, label: str, mode: GenerationMode
) -> None:
    """Generated requests (valid, and invalid by the schema): every schemathesis check passes
    (no 5xx, documented status codes, headers and content types, conformant bodies, invalid
    data rejected and valid data accepted).

    Derandomized and bounded: the same examples on every run.  The admin routes answer 403
    (no admin key configured): what is fuzzed there is that no header value gets further.
    """
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the OpenAPI schema"

    strategy = operation.as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE:
        strategy = strategy.map(_within_the_future_bound)

    @given(case=strategy)
    @settings(max_examples=BUDGET[label, mode], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    def check(case: Any) -> None:
        response = case.call_and_validate(checks=CHECKS)
        assert response.status_code < 500, response.text

    check()


def _within_the_future_bound(case: Any) -> Any:
    """A schema-valid case with its timestamps moved to now, where they lay more than the
    contract's future bound ahead: a rule of time that JSON Schema cannot state, so the
    positive-data check would otherwise expect such a (correctly refused) event accepted."""
    body = case.body
    txns = body.get("transactions") if isinstance(body, dict) else None
    for txn in txns if isinstance(txns, list) else [body]:
        ts = txn.get("event_timestamp") if isinstance(txn, dict) else None
        if isinstance(ts, str):
            try:
                when = datetime.fromisoformat(ts.replace("Z", "+00:00"))
            except ValueError:
                continue
            if when.tzinfo and when > datetime.now(UTC) + timedelta(seconds=60):
                txn["event_timestamp"] = datetime.now(UTC).isoformat()
    return case


def test_every_route_is_fuzzed(api_schema: Any) -> None:
    labels = {op.ok().label for op in api_schema.get_all_operations()}
    assert labels == {label for label, _ in BUDGET}


# --- the hostile corpus ----------------------------------------------------------------------


def _raw(**changes: Any) -> bytes:
    """VALID with `changes` as JSON text; a str value is spliced in raw (NaN, 1e400 ...)."""
    parts = []
    for key, value in {**VALID, **changes}.items():
        text = value if isinstance(value, str) and key in _RAW_FIELDS else json.dumps(value)
        parts.append(f"{json.dumps(key)}: {text}")
    return ("{" + ", ".join(parts) + "}").encode()


_RAW_FIELDS = {"amount"}
_JSON = {"content-type": "application/json"}


def _nested(depth: int, opening: str, closing: str, inner: str = "") -> bytes:
    return (opening * depth + inner + closing * depth).encode()


@dataclass(frozen=True)
class Hostile:
    """One hostile request and what must come back: the status (or any 4xx) and the fields."""

    body: bytes | None
    headers: dict[str, str] = field(default_factory=lambda: dict(_JSON))
    status: int | None = None  # None: any 4xx
    fields: set[str] | None = None  # fields the 422 must name (a subset)
    path: str = "/v1/score"


def _ts(value: str) -> bytes:
    return json.dumps({**VALID, "event_timestamp": value}).encode()


CORPUS: dict[str, Hostile] = {
    # numbers the contract forbids, written as the raw tokens a lenient encoder emits
    "nan": Hostile(_raw(amount="NaN"), status=422, fields={"amount"}),
    "infinity": Hostile(_raw(amount="Infinity"), status=422, fields={"amount"}),
    "minus_infinity": Hostile(_raw(amount="-Infinity"), status=422, fields={"amount"}),
    "overflowing_float_1e400": Hostile(_raw(amount="1e400"), status=422, fields={"amount"}),
    "huge_float_1e308": Hostile(_raw(amount="1e308"), status=422, fields={"amount"}),
    "huge_int_10_pow_400": Hostile(_raw(amount=str(10**400)), status=422, fields={"amount"}),
    "int_beyond_the_digit_limit": Hostile(_raw(amount="9" * 5000)),  # Python refuses > 4300
    "denormal_amount": Hostile(_raw(amount="5e-324"), status=200),
    # size: over the cap with a Content-Length (refused unread) and streamed (counted)
    "huge_body": Hostile(b'{"transaction_id": "' + b"x" * (MAX_BODY + 1) + b'"}', status=413),
    "invalid_content_length": Hostile(json.dumps(VALID).encode(),
                                      {**_JSON, "content-length": "lots"}, status=413),
    "huge_batch_body": Hostile(json.dumps({"transactions": [VALID] * 12_000}).encode(),
                               path="/v1/score/batch", status=413),
    # structure
    "nested_arrays_10k": Hostile(_nested(10_000, "[", "]")),
    "nested_objects_10k": Hostile(_nested(10_000, '{"a": ', "}", "1")),
    "nested_unknown_field": Hostile(
        json.dumps({**VALID, "x": json.loads(_nested(500, '{"a": ', "}", "1"))}).encode(),
        status=422, fields={"x"}),
    "unknown_fields": Hostile(json.dumps({**VALID, "is_fraud": 0, "score": 1}).encode(),
                              status=422, fields={"is_fraud", "score"}),
    "many_unknown_fields": Hostile(json.dumps({**VALID, **{f"k{i}": i for i in range(2000)}}
                                              ).encode(), status=422, fields={"k0", "body"}),
    "empty_body": Hostile(b"", status=422, fields={"body"}),
    "json_null": Hostile(b"null", status=422, fields={"body"}),
    "json_string": Hostile(b'"transaction"', status=422, fields={"body"}),
    "array_instead_of_object": Hostile(json.dumps([VALID]).encode(), status=422,
                                       fields={"body"}),
    "truncated_json": Hostile(json.dumps(VALID).encode()[:-3], status=422, fields={"body"}),
    "batch_of_1001": Hostile(json.dumps({"transactions": [VALID] * 1001}).encode(),
                             path="/v1/score/batch", status=422, fields={"transactions"}),
    "empty_batch": Hostile(b'{"transactions": []}', path="/v1/score/batch", status=422,
                           fields={"transactions"}),
    "batch_item_names_its_index": Hostile(
        json.dumps({"transactions": [VALID, {**VALID, "amount": -1}]}).encode(),
        path="/v1/score/batch", status=422, fields={"transactions.1.amount"}),
    # encodings and content types
    "invalid_utf8": Hostile(json.dumps(VALID).encode().replace(b"fz-user", b"fz-\xff\xfe")),
    "lone_surrogate_value": Hostile(json.dumps(VALID).encode().replace(b"fz-user", b"\\ud800"),
                                    status=422, fields={"user_id"}),
    "lone_surrogate_key": Hostile(json.dumps({**VALID, "\ud800": 1}).encode(), status=422),
    "text_plain": Hostile(json.dumps(VALID).encode(), {"content-type": "text/plain"}),
    "form_urlencoded": Hostile(b"transaction_id=fz-1&amount=1",
                               {"content-type": "application/x-www-form-urlencoded"}),
    "xml": Hostile(b"<transaction><amount>1</amount></transaction>",
                   {"content-type": "application/xml"}),
    "no_content_type": Hostile(json.dumps(VALID).encode(), {}),
    # time: the contract wants an aware ISO-8601 string not too far ahead
    "year_1900": Hostile(_ts("1900-01-01T00:00:00Z"), status=200),
    "year_1": Hostile(_ts("0001-01-01T00:00:00Z"), status=200),
    "year_9999": Hostile(_ts("9999-12-31T23:59:59Z"), status=422, fields={"event_timestamp"}),
    "year_9999_behind_utc": Hostile(_ts("9999-12-31T23:59:59-01:00"), status=422,
                                    fields={"event_timestamp"}),  # year 10000 in UTC
    "year_1_ahead_of_utc": Hostile(_ts("0001-01-01T00:30:00+01:00"), status=422,
                                   fields={"event_timestamp"}),  # year 0 in UTC
    "naive_timestamp": Hostile(_ts("2026-11-01T10:00:00"), status=422,
                               fields={"event_timestamp"}),
    "epoch_number_timestamp": Hostile(json.dumps({**VALID, "event_timestamp": 1e18}).encode(),
                                      status=422, fields={"event_timestamp"}),
}


def assert_rejection(resp: Any, case: Hostile) -> None:
    """A JSON `{"detail": ...}` 4xx (or the expected status), without a traceback."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if case.status is not None:
        assert resp.status_code == case.status, (resp.status_code, resp.text[:500])
    if resp.status_code == 200:
        return
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    body = resp.json()
    assert set(body) == {"detail"}, body
    if resp.status_code == 422:
        detail = body["detail"]
        assert isinstance(detail, list) and detail, detail
        assert all(set(e) == {"field", "message", "type"} and e["field"] for e in detail)
        named = {e["field"] for e in detail}
        assert case.fields is None or case.fields <= named, (case.fields, named)


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_request_is_a_clean_4xx(client: TestClient, name: str) -> None:
    case = CORPUS[name]
    resp = client.post(case.path, content=case.body, headers=case.headers)
    assert_rejection(resp, case)


def test_a_422_lists_at_most_50_problems_and_counts_the_rest(client: TestClient) -> None:
    body = json.dumps({**VALID, **{f"k{i}": i for i in range(20_000)}}).encode()
    resp = client.post("/v1/score", content=body, headers=_JSON)
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert [e["field"] for e in detail[:50]] == [f"k{i}" for i in range(50)]
    assert detail[50] == {"field": "body", "type": "too_many_errors",
                          "message": "19950 more problems not listed"}
    assert len(detail) == 51 and len(resp.content) < len(body) // 20


@pytest.mark.parametrize("path", ["/v1/score", "/v1/score/batch"])
def test_streamed_body_over_the_cap_is_cut_off(client: TestClient, path: str) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"transaction_id": "'
        for _ in range(30):  # 3 MB in all, no Content-Length
            sent += 100_000
            yield b"x" * 100_000
        yield b'"}'

    resp = client.post(path, content=chunks(), headers=_JSON)
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert_rejection(resp, Hostile(None, status=413))
    assert resp.json()["detail"] == f"request body larger than {MAX_BODY} bytes"


def test_method_and_query_errors_are_4xx(client: TestClient) -> None:
    assert client.put("/v1/score", json=VALID).status_code == 405
    resp = client.post("/v1/score?explain=perhaps", json=VALID)
    assert_rejection(resp, Hostile(None, status=422, fields={"query.explain"}))


# --- an endless chunked upload to a real server ---------------------------------------------


@pytest.fixture(scope="module")
def server(fuzz_artifact: Path, materialized_store: Any) -> Iterator[tuple[str, int]]:
    """The app under uvicorn on a free loopback port, in a thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    app: FastAPI = create_app(_settings(fuzz_artifact))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield ("127.0.0.1", port)
    finally:
        srv.should_exit = True
        thread.join(15)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def test_endless_chunked_upload_is_answered_413(server: tuple[str, int]) -> None:
    """Transfer-Encoding: chunked that never ends: the server must stop reading and answer."""
    frame = _chunk(b"x" * 65_536)
    limit = 40 * MAX_BODY  # give up (failing the test) after 40 MB sent without an answer
    sent, reply = 0, b""
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + _chunk(b'{"transaction_id": "'))
        sock.setblocking(False)
        while sent < limit and b"\r\n\r\n" not in reply:
            try:
                data = sock.recv(65_536)
                if not data:
                    break  # closed by the server
                reply += data
                continue
            except BlockingIOError:
                pass
            try:
                sent += sock.send(frame)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed after answering: read what it sent
        sock.settimeout(5)
        try:  # the rest of the answer: until the server closes (it cannot keep this connection)
            while data := sock.recv(65_536):
                reply += data
        except (ConnectionResetError, TimeoutError):
            pass
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), (sent, reply[:300])
    assert sent < 10 * MAX_BODY, f"{sent} bytes were sent before the server answered"
    headers = dict(line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:])
    assert headers[b"connection"] == b"close"  # the server stops reading this connection
    assert body == json.dumps({"detail": f"request body larger than {MAX_BODY} bytes"},
                              separators=(",", ":")).encode()  # and nothing after it
