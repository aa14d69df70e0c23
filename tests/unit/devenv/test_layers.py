"""The package graph is layered (tests/integration/test_runtime_imports.py checks what each
runtime loads and exports)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devenv.layers import RANK, import_graph, main, violations


def test_no_import_points_up_or_sideways() -> None:
    edges = import_graph()
    assert set(edges) <= set(RANK)
    assert violations(edges) == []
    assert "streaming" not in edges["serving"] and "serving" not in edges["streaming"]


def test_a_layering_violation_is_reported() -> None:
    edges = {"scoring": {"serving": ["scoring/x.py:1"]}, "serving": {"scoring": ["y.py:2"]}}
    assert violations(edges) == ["scoring -> serving (scoring/x.py:1)"]


def test_a_cycle_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tree where scoring and serving import each other (one of them function-locally):
    the graph shows both edges and the check exits 1 naming the edge that points up."""
    for pkg, code in (("scoring", "def f() -> None:\n    from serving import app\n"),
                      ("serving", "from scoring import core\n")):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text(code)
    assert main(tmp_path) == 1
    out, err = capsys.readouterr()
    assert "scoring       -> serving" in out and "serving       -> scoring" in out
    assert err == "layering violation: scoring -> serving (scoring/m.py:2)\n"
    assert main() == 0
