"""Feature drift: population stability index (PSI) of served vectors against training.

The reference is written by `training.train` next to the model's metadata as `reference.json`:
per feature, the interior cut points of 10 quantile bins of the training rows and the share of
training rows in each bin, plus the share that was missing.  Bins are right-closed
(`edges[i-1] < x <= edges[i]`); repeated quantiles (discrete features) collapse into one edge,
and missing values (None/NaN) are a bin of their own, so a feature that goes missing drifts.

PSI = sum over bins of (actual - expected) * ln(actual / expected), shares floored at 1e-4.
Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 large shift.

`DriftMonitor` keeps the scorer's most recent vectors in a bounded window and, from a daemon
thread, recomputes every feature's PSI and exports it as `fraud_feature_psi{feature}`, but only
once the window holds `PSI_MIN_SAMPLES` vectors: over fewer, PSI mostly measures sampling noise
(the alert rule on it and the skew audit rely on that floor).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scoring import metrics

log = logging.getLogger("scoring.drift")

REFERENCE_FILE = "reference.json"
BINS = 10
_FLOOR = 1e-4
PSI_MIN_SAMPLES = 100  # below this many vectors PSI is mostly sampling noise: not exported


def _num(v: Any) -> float:
    try:
        return math.nan if v is None else float(v)
    except TypeError:  # pandas' NA
        return math.nan


def _as_float(values: Iterable[Any]) -> np.ndarray:
    return np.array([_num(v) for v in values], dtype="float64")


def bin_shares(values: Iterable[Any], edges: Sequence[float]) -> list[float]:
    """Share of `values` in each bin of `edges` (len(edges) + 1 bins), then the missing share."""
    x = _as_float(values)
    n = len(x)
    if n == 0:
        return [0.0] * (len(edges) + 2)
    missing = np.isnan(x)
    counts = np.bincount(np.searchsorted(np.asarray(edges, dtype="float64"), x[~missing],
                                         side="left"), minlength=len(edges) + 1)
    return [float(c) / n for c in counts] + [float(missing.sum()) / n]


def feature_reference(values: Iterable[Any], bins: int = BINS) -> dict[str, Any]:
    """Quantile edges of the non-missing values and the shares of all values per bin."""
    x = _as_float(values)
    present = x[~np.isnan(x)]
    edges: list[float] = []
    if len(present):
        qs = np.quantile(present, np.arange(1, bins) / bins, method="linear")
        edges = sorted({float(q) for q in qs})
    shares = bin_shares(x, edges)
    return {"edges": edges, "proportions": shares[:-1], "missing": shares[-1]}


def build_reference(columns: Mapping[str, Any], bins: int = BINS) -> dict[str, Any]:
    """The `reference.json` document for equally long feature columns (name -> values)."""
    features = {name: feature_reference(values, bins) for name, values in columns.items()}
    rows = len(next(iter(columns.values()))) if columns else 0
    return {"bins": bins, "rows": rows, "features": features}


def write_reference(directory: Path, columns: Mapping[str, Any]) -> Path:
    """Write `reference.json` into a model artifact directory; return its path."""
    path = directory / REFERENCE_FILE
    path.write_text(json.dumps(build_reference(columns), indent=1))
    return path


def load_reference(directory: Path) -> dict[str, Any] | None:
    """The reference saved with a model artifact, or None when it has none."""
    path = directory / REFERENCE_FILE
    if not path.is_file():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two share vectors over the same bins."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, _FLOOR), max(a, _FLOOR)
        total += (a - e) * math.log(a / e)
    return total


def feature_psi(ref: Mapping[str, Any], values: Iterable[Any]) -> float:
    """PSI of `values` against one feature's reference entry."""
    return psi([*ref["proportions"], ref["missing"]], bin_shares(values, ref["edges"]))


def psi_by_feature(reference: Mapping[str, Any], columns: Mapping[str, Iterable[Any]]
                   ) -> dict[str, float]:
    """PSI of every feature that is both in the reference and in `columns`."""
    refs = reference["features"]
    return {name: feature_psi(refs[name], values) for name, values in columns.items()
            if name in refs}


class DriftMonitor:
    """PSI gauges over the scorer's `window` most recent vectors, refreshed every `interval_s`.

    `observe` only appends to a bounded deque (safe to call on the event loop); the
    computation runs on a daemon thread, and no gauge is set before `min_samples` vectors were
    seen (at least `PSI_MIN_SAMPLES`; a smaller window would never export).
    """

    def __init__(self, reference: Mapping[str, Any], window: int = 5000,
                 interval_s: float = 60.0, min_samples: int = PSI_MIN_SAMPLES) -> None:
        if min_samples < PSI_MIN_SAMPLES:
            raise ValueError(f"min_samples must be at least {PSI_MIN_SAMPLES}, got {min_samples}")
        self.reference = reference
        self.features = list(reference["features"])
        self.min_samples = min_samples
        self._recent: deque[tuple[Any, ...]] = deque(maxlen=window)
        self._interval = interval_s
        self._stop = threading.Event()
        self._exported: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
        self._thread.start()

    def observe_rows(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Vectors' values of `features`, in that order, one tuple per vector
        (`scoring.features.value_rows`)."""
        self._recent.extend(rows)

    def observe(self, vectors: Iterable[Mapping[str, Any]]) -> None:
        """Vectors' values by name (None for a feature a vector lacks)."""
        features = self.features
        self.observe_rows(tuple([values.get(f) for f in features]) for values in vectors)

    def compute(self) -> dict[str, float]:
        """PSI per feature over the current window; sets the gauges. {} below min_samples."""
        rows = list(self._recent)
        if len(rows) < self.min_samples:
            return {}
        columns = {f: [r[i] for r in rows] for i, f in enumerate(self.features)}
        out = psi_by_feature(self.reference, columns)
        for name, value in out.items():
            metrics.FEATURE_PSI.labels(name).set(value)
            self._exported.add(name)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.compute()
            except Exception:  # noqa: BLE001 - a monitoring failure must not stop the scorer
                log.exception("drift computation failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for name in self._exported:
            metrics.retire(metrics.FEATURE_PSI, name)
        self._exported.clear()
