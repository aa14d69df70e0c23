"""`fraud_feature_psi` is exported only over a minimum sample (`scoring.drift.PSI_MIN_SAMPLES`)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY

from scoring import drift

FEATURES = ("drift_test_a", "drift_test_b")  # names no other test exports


def reference() -> dict[str, Any]:
    return drift.build_reference({f: [float(i % 10) for i in range(1000)] for f in FEATURES})


def exported(feature: str) -> float | None:
    return REGISTRY.get_sample_value("fraud_feature_psi", {"feature": feature})


@pytest.fixture
def monitor() -> Any:
    mon = drift.DriftMonitor(reference(), window=500, interval_s=3600)
    yield mon
    mon.close()


def test_no_gauge_below_the_minimum_sample(monitor: drift.DriftMonitor) -> None:
    assert drift.PSI_MIN_SAMPLES == 100
    assert monitor.min_samples == drift.PSI_MIN_SAMPLES
    shifted = {f: 50.0 for f in FEATURES}  # every vector far outside the training bins
    monitor.observe([shifted] * (drift.PSI_MIN_SAMPLES - 1))
    assert monitor.compute() == {}
    assert all(exported(f) is None for f in FEATURES), "no PSI over 99 vectors"

    monitor.observe([shifted])
    psi = monitor.compute()
    assert set(psi) == set(FEATURES) and all(v > 1.0 for v in psi.values())
    assert all(exported(f) == pytest.approx(psi[f]) for f in FEATURES)


def test_gauges_are_removed_on_close() -> None:
    mon = drift.DriftMonitor(reference(), window=500, interval_s=3600)
    mon.observe([{f: float(i % 10) for f in FEATURES} for i in range(drift.PSI_MIN_SAMPLES)])
    assert mon.compute()
    assert exported(FEATURES[0]) is not None
    mon.close()
    assert all(exported(f) is None for f in FEATURES)


def test_a_smaller_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="min_samples"):
        drift.DriftMonitor(reference(), min_samples=drift.PSI_MIN_SAMPLES - 1)


@pytest.mark.parametrize("features", [FEATURES, FEATURES[:1]])
def test_observe_keeps_each_vectors_values_in_order_none_when_absent(features: Any) -> None:
    ref = drift.build_reference({f: [float(i % 10) for i in range(1000)] for f in features})
    mon = drift.DriftMonitor(ref, window=4, interval_s=3600)
    try:
        full = {f: float(i) for i, f in enumerate(features)} | {"other": 9.0}
        short = {features[-1]: None}  # the first feature absent
        mon.observe([full, short])
        assert list(mon._recent) == [tuple(float(i) for i in range(len(features))),
                                     tuple(short.get(f) for f in features)]
        mon.observe([full] * 5)  # a bounded window: the newest 4
        assert len(mon._recent) == 4
    finally:
        mon.close()
