"""`OnlineFeatures.assemble` on the reader's columns: the TTL rule, the missing-value rule
(None, or a float NaN, and nothing else) and the model's rows, for batches on both sides of
`_MATRIX_MIN_ROWS` and with on-demand outputs that are not plain numbers."""

from __future__ import annotations

import math
import random
import struct
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from scoring import features as F
from scoring.scorer import model_row

T0 = 1_764_936_000_000_000  # request time, epoch microseconds
TTL_US = 3_600_000_000


def _features(extra: dict[str, Any]) -> F.OnlineFeatures:
    """Two stored views ("a", "b" with a TTL; "c" without) and one on-demand view adding
    `extra`'s columns: the reads `assemble` needs, without a feature store."""
    online = object.__new__(F.OnlineFeatures)
    online.request_fields = []
    online._reads = [SimpleNamespace(features=["a", "b"], ttl_us=TTL_US),
                     SimpleNamespace(features=["c"], ttl_us=None)]
    udf = SimpleNamespace(udf=lambda inputs: {k: list(v) for k, v in extra.items()})
    online._odfvs = [(SimpleNamespace(feature_transformation=udf), list(extra))]
    online.output = ["a", "b", "c", *extra]
    return online


def _columns(n: int, rng: random.Random) -> tuple[list[dict[str, Any]], list[Any]]:
    rows = [{"request_ts_us": T0} for _ in range(n)]
    times = [rng.choice([None, T0, T0 - 1, T0 - TTL_US, T0 - TTL_US - 1, T0 + 1]) for _ in range(n)]
    values = [[rng.choice([None, math.nan, -0.0, 1.5, 7, True]) for _ in range(n)] for _ in "ab"]
    for i, t in enumerate(times):  # the reader answers None for the values of a missing row
        if t is None:
            for col in values:
                col[i] = None
    other = [T0 - 5] * n, [[rng.choice([None, 2.5, 3]) for _ in range(n)]]
    return rows, [(times, values), other]


def _exact(v: Any) -> Any:
    return struct.pack("<d", v) if isinstance(v, float) else (type(v).__name__, v)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100])
@pytest.mark.parametrize("extra", ["numbers", "float32 NaN", "text"])
def test_assemble_rules(n: int, extra: str) -> None:
    rng = random.Random(n)
    odfv = {"numbers": [rng.choice([0.25, math.nan, None, 3]) for _ in range(n)],
            "float32 NaN": [np.float32("nan")] * n,  # not a float: not missing
            "text": ["x"] * n}[extra]
    online = _features({"d": odfv})
    rows, fetched = _columns(n, rng)
    (times, values), _ = fetched
    stored = {"a": list(values[0]), "b": list(values[1])}
    vectors = online.assemble(rows, fetched)
    assert len(vectors) == n
    for i, vec in enumerate(vectors):
        t = times[i]
        stale = t is not None and (t > T0 or t < T0 - TTL_US)
        assert vec.stale == (["a", "b"] if stale else [])
        for name in "ab":
            want = None if stale else stored[name][i]
            assert _exact(vec.values[name]) == _exact(want)
        assert vec.missing == [k for k, v in vec.values.items()
                               if v is None or (isinstance(v, float) and v != v)]
        if vec.inputs is None:
            assert n < F._MATRIX_MIN_ROWS or extra != "numbers"
        else:
            assert n >= F._MATRIX_MIN_ROWS and extra == "numbers"
            assert vec.input_names is online.output
            want_row = np.array(model_row(vec, online.output), dtype=np.float64)
            assert vec.inputs.tobytes() == want_row.tobytes()


def test_model_matrix_takes_only_plain_numbers() -> None:
    """Values `float()` refuses or converts differently are left to `model_row`."""
    assert F._model_matrix([[1.0] * 8, [None, 2, True, 0.5, 1, 1, 1, 1]], 8) is not None
    for odd in ([[1.0]] * 8, [np.timedelta64(5, "s")] * 8, [10**400] * 8, ["1.5"] * 8):
        assert F._model_matrix([odd, [2.0] * 8], 8) is None
