"""`OnlineFeatures.assemble` on the reader's columns: the TTL rule, the missing-value rule
(None, or a float NaN, and nothing else) and the model's rows, for batches on both sides of
`_MATRIX_MIN_ROWS` and with on-demand outputs that are not plain numbers."""

from __future__ import annotations

import math
import pickle
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
        fresh = {} if t is None or stale else {"a": (T0 - t) / 1e6, "b": (T0 - t) / 1e6}
        assert vec.ages == {**fresh, "c": 5 / 1e6}
        assert list(vec.values) == online.output
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


def test_vectors_of_a_batch_build_their_dicts_when_asked() -> None:
    online = _features({"d": [0.5] * 20})
    rows, fetched = _columns(20, random.Random(3))
    lazy = online.assemble(rows, fetched)
    assert all(v._values is None and v._ages is None for v in lazy)  # nothing built yet
    eager = [F.FeatureVector(dict(v.values), dict(v.ages), list(v.missing), list(v.stale))
             for v in online.assemble(rows, fetched)]
    assert lazy == eager and repr(lazy[3]) == repr(eager[3])
    assert lazy[0] != F.FeatureVector({}, {}, [], [])
    copied = pickle.loads(pickle.dumps(lazy[4]))
    assert copied._batch is None and repr(copied) == repr(eager[4])
    lazy[5].values = {"a": 1}  # a dict of its own, as before
    assert lazy[5].values == {"a": 1} and lazy[6].values == eager[6].values


@pytest.mark.parametrize("n", [1, 20])
def test_value_rows_are_each_vectors_values(n: int) -> None:
    online = _features({"d": [0.5] * n})
    rows, fetched = _columns(n, random.Random(n))
    names = ["d", "a", "c"]  # not the output's order
    vectors = online.assemble(rows, fetched)
    expected = [tuple(v.values.get(k) for k in names) for v in vectors]
    fresh = online.assemble(rows, fetched)
    assert [_exact_row(r) for r in F.value_rows(fresh, names)] == \
        [_exact_row(r) for r in expected]
    assert all(v._values is None for v in fresh)  # the whole batch: from its columns
    # a part of a batch, another order, or a name the batch lacks: value by value
    for part, keys in ((fresh[::-1], names), (fresh[1:], names), (fresh, [*names, "zz"])):
        assert [_exact_row(r) for r in F.value_rows(part, keys)] == \
            [_exact_row(tuple(v.values.get(k) for k in keys)) for v in part]
    assert list(F.value_rows([], names)) == []
    assert list(F.value_rows(fresh, [])) == [()] * n


def _exact_row(row: tuple[Any, ...]) -> list[Any]:
    return [_exact(v) for v in row]


def test_stacked_inputs_are_the_vectors_rows() -> None:
    online = _features({"d": [0.5] * 20})
    rows, fetched = _columns(20, random.Random(5))
    vectors = online.assemble(rows, fetched)
    whole = F.stacked_inputs(vectors, online.output)
    assert whole is not None and whole.flags.c_contiguous
    assert whole.tobytes() == np.stack([v.inputs for v in vectors]).tobytes()  # type: ignore[misc]
    part = F.stacked_inputs(vectors[::2], online.output)
    assert part is not None and part.tobytes() == whole[::2].tobytes()
    assert F.stacked_inputs(vectors, list(online.output)) is None  # another feature list
    few = online.assemble(rows[:3], [(t[:3], [c[:3] for c in v]) for t, v in fetched])
    assert F.stacked_inputs(few, online.output) is None  # below _MATRIX_MIN_ROWS: model_row
