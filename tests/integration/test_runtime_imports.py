"""Each runtime loads, and exports, only its own parts: the HTTP scorer neither Bytewax nor
the dataflow, and each its own metric families (fresh interpreters, as a deployment starts)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import PROJECT


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout


def test_the_http_scorer_loads_neither_bytewax_nor_the_dataflow() -> None:
    loaded = _run("import serving.app, sys; print(sorted({m.split('.')[0] for m in sys.modules"
                  " if m.split('.')[0] in ('bytewax', 'streaming', 'training', 'devenv')}))")
    assert loaded.strip() == "[]"


def test_each_runtime_exports_only_its_own_metric_families() -> None:
    families = ("from prometheus_client import REGISTRY; "
                "print(sorted({m.name for m in REGISTRY.collect() if m.name.startswith('fraud_')}))")
    http = _run("import serving.app; " + families)
    stream = _run("import streaming.features, streaming.score; " + families)
    assert "fraud_stream_" not in http and "fraud_requests" in http
    assert "fraud_stream_" in stream
    for http_only in ("fraud_requests", "fraud_request_latency", "fraud_model_reloads",
                      "fraud_inflight_rows", "fraud_model_registry_ok"):
        assert http_only not in stream, http_only
