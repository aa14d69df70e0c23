"""The notebooks under notebooks/ run top to bottom on the test session's data.

Each runs in a fresh kernel (nbclient) with this session's environment (FRAUD_DATA_DIR,
FEAST_REGISTRY_URL, REDIS_URL set by conftest) and the project root as working directory, with
a bound on every cell and on the whole run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

PROJECT = Path(__file__).resolve().parents[3]
NOTEBOOK = PROJECT / "notebooks" / "historical_features.ipynb"
CELL_TIMEOUT_S = 300
STARTUP_TIMEOUT_S = 60


def outputs(nb: Any) -> list[dict[str, Any]]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


@pytest.mark.integration
@pytest.mark.slow
def test_historical_features_notebook_runs(store: Any) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "commit the notebook without outputs")
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, startup_timeout=STARTUP_TIMEOUT_S,
        resources={"metadata": {"path": str(PROJECT)}},
    )
    # raises CellExecutionError, with the cell and its traceback, on any error
    client.execute(env={**os.environ, "MPLBACKEND": "Agg"})

    outs = outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    stderr = "".join(o.get("text", "") for o in outs if o.get("name") == "stderr")
    assert "Traceback" not in stderr, stderr
    text = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    assert "model inputs:" in text and "ROC-AUC" in text, text
    assert any("image/png" in o.get("data", {}) for o in outs), "no evaluation plot"
