"""The package graph is layered (tests/integration/test_runtime_imports.py checks what each
runtime loads and exports)."""

from __future__ import annotations

from devenv.layers import RANK, import_graph, violations


def test_no_import_points_up_or_sideways() -> None:
    edges = import_graph()
    assert set(edges) <= set(RANK)
    assert violations(edges) == []
    assert "streaming" not in edges["serving"] and "serving" not in edges["streaming"]


def test_a_layering_violation_is_reported() -> None:
    edges = {"scoring": {"serving": ["scoring/x.py:1"]}, "serving": {"scoring": ["y.py:2"]}}
    assert violations(edges) == ["scoring -> serving (scoring/x.py:1)"]
