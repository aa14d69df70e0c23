"""`scoring.metrics.observe_all` counts what one `observe` per value counts."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram

from scoring.metrics import _OBSERVE_ALL_MIN, observe_all

BUCKETS = tuple(i / 20 for i in range(1, 21))  # the score histogram's


def _samples(h: Histogram) -> dict[str, float]:
    (metric,) = list(h.collect())
    return {f"{s.name}{sorted(s.labels.items())}": s.value for s in metric.samples
            if not s.name.endswith("_created")}


@pytest.mark.parametrize("values", [
    [0.0, 0.05, 0.0500001, 0.5, 0.999, 1.0, 1.5, -0.1, 0.05, 0.3],  # on and between bounds
    [math.nan, 0.2, math.inf, -math.inf],
    [],
    [0.7] * 1000,
    # past `_OBSERVE_ALL_MIN`: counted by numpy
    [0.0, 0.05, 0.0500001, 0.5, 0.999, 1.0, 1.5, -0.1, 0.05, 0.3] * 3,
    [math.nan, 0.2, math.inf, -math.inf, 0.05, 1.0] * 5,
])
def test_observe_all_is_observe_per_value(values: list[float]) -> None:
    assert _OBSERVE_ALL_MIN <= 30  # the last cases take the numpy path
    one, batch = (Histogram("h", "h", buckets=BUCKETS, registry=CollectorRegistry())
                  for _ in range(2))
    for v in values:
        one.observe(v)
    observe_all(batch, values)
    expected, got = _samples(one), _samples(batch)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        if name.startswith("h_sum"):
            assert got[name] == pytest.approx(value, nan_ok=True)
        else:
            assert got[name] == value, name  # bucket and count samples exactly


def test_observe_all_on_a_labelled_histogram_needs_its_child() -> None:
    h = Histogram("h", "h", ["decision"], buckets=BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError):
        observe_all(h, [0.5])
    observe_all(h.labels("approve"), [0.5, 0.6])
    assert _samples(h)["h_count[('decision', 'approve')]"] == 2
