"""The vectorised twins of the on-demand views equal their python UDFs bit for bit.

The UDFs (feature_repo.definitions) are what the online scorer runs; offline retrieval runs the
twins (feature_repo.vectorised) instead when they accept the table.  Each case builds an Arrow
table as the retrieval job sees it, applies the UDF the way the job does (`to_pydict` in,
`pa.Table.from_pydict` out) and the twin, and requires the same types and the same bits
(floats compared as int64 views, so NaN == NaN and -0.0 != 0.0).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from feature_repo import definitions
from feature_repo.vectorised import transaction_twin, twin_for, velocity_twin
from feature_repo.velocity import HORIZON_US, HOUR_US, MINUTE_US, UserVelocityState

T0 = 1_792_000_000_000_000  # 2026-10-15, epoch microseconds
BOUNDARIES = [0, 1, -1, 10 * MINUTE_US, HOUR_US, HORIZON_US]  # offsets before t (and +-1 us)
VELOCITY_SCHEMA = pa.schema([
    ("recent_txn_ts", pa.list_(pa.int64())), ("recent_amounts", pa.list_(pa.float64())),
    ("recent_merchants", pa.list_(pa.string())), ("known_merchants", pa.list_(pa.string())),
    ("known_merchant_first_ts", pa.list_(pa.int64())), ("request_ts_us", pa.int64()),
    ("txn_merchant_id", pa.string()),
])
TRANSACTION_SCHEMA = pa.schema([
    ("txn_amount", pa.float64()), ("txn_channel", pa.string()), ("request_ts_us", pa.int64()),
    ("user_amount_mean_30d", pa.float64()), ("user_amount_std_30d", pa.float64()),
    ("user_utc_offset_hours", pa.float64()), ("user_usual_hour_30d", pa.float64()),
])


def _udf(name: str, table: pa.Table) -> pa.Table:
    udf = getattr(definitions, name).feature_transformation.udf
    return pa.Table.from_pydict(udf(table.to_pydict()))


def _assert_same(got: pa.Table | None, want: pa.Table) -> None:
    assert got is not None, "the twin declined a table it should accept"
    assert got.schema == want.schema
    for name in want.column_names:
        a, b = got[name].to_numpy(), want[name].to_numpy()
        if a.dtype == np.float64:
            a, b = a.view(np.int64), b.view(np.int64)
        assert np.array_equal(a, b), name


def _velocity_row(rng: np.random.Generator, t: int) -> dict[str, Any]:
    """A row as UserVelocityState writes it, with events placed on and around window edges."""
    state = UserVelocityState()
    merchants = [f"m{i}" for i in range(int(rng.integers(1, 8)))] + ["é", "Z", ""]
    offsets = rng.choice(BOUNDARIES, int(rng.integers(0, 6))) + rng.choice([-1, 0, 1])
    spread = rng.integers(-2 * HORIZON_US, HOUR_US, int(rng.integers(0, 25)))
    times = sorted({int(t - o) for o in [*offsets, *spread]})
    amounts = [float(x) for x in np.round(rng.lognormal(3, 1.5, len(times)), 2)]
    for k, ts in enumerate(times):
        amount = rng.choice([amounts[k], amounts[k], np.nan, -0.0, 1e16, 0.1])
        state.apply(f"x{k}", ts, float(amount), str(rng.choice(merchants)))
    row = state.row()
    return {f: row[f] for f in VELOCITY_SCHEMA.names[:5]}


def _velocity_table(seed: int, n: int = 400) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        t = T0 + int(rng.integers(-HORIZON_US, HORIZON_US))
        row = _velocity_row(rng, t) if rng.random() > 0.1 else dict.fromkeys(
            VELOCITY_SCHEMA.names[:5], None if rng.random() < 0.5 else [])  # no row / empty
        if row["known_merchants"] and rng.random() < 0.3:  # the request's merchant first seen
            j = int(rng.integers(len(row["known_merchants"])))  # exactly at, after, before t
            row["known_merchant_first_ts"][j] = t + int(rng.choice([0, 1, -1]))
            merchant = row["known_merchants"][j]
        else:
            merchant = rng.choice([None, "m0", "m3", "unknown", "", "é"])
        rows.append({**row, "request_ts_us": t, "txn_merchant_id": merchant})
    return pa.Table.from_pylist(rows, schema=VELOCITY_SCHEMA)


@pytest.mark.parametrize("seed", range(6))
def test_velocity_twin_equals_the_udf_on_random_rows(seed: int) -> None:
    table = _velocity_table(seed)
    _assert_same(velocity_twin(table), _udf("user_velocity_odfv", table))


def test_velocity_twin_edge_cases() -> None:
    t = T0
    cases = [
        # no history at all, as null lists and as empty lists
        dict.fromkeys(VELOCITY_SCHEMA.names[:5], None),
        dict.fromkeys(VELOCITY_SCHEMA.names[:5], []),
        # one event at each window boundary, at t itself and just after t
        {"recent_txn_ts": [t - HORIZON_US - 1, t - HORIZON_US, t - HOUR_US, t - 10 * MINUTE_US,
                           t - 1, t, t + 1],
         "recent_amounts": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
         "recent_merchants": ["a", "b", "a", "c", "c", "d", "e"],
         "known_merchants": ["a", "b", "c"], "known_merchant_first_ts": [t - 5, t, t + 1]},
        # duplicate event times, NaN and negative zero amounts
        {"recent_txn_ts": [t - 5, t - 5, t - 5], "recent_amounts": [np.nan, -0.0, 1.5],
         "recent_merchants": ["a", "a", "b"], "known_merchants": ["a", "b"],
         "known_merchant_first_ts": [t - 5, t - 5]},
        {"recent_txn_ts": [t - 3], "recent_amounts": [-0.0], "recent_merchants": ["a"],
         "known_merchants": ["a"], "known_merchant_first_ts": [t]},
        # a merchant listed twice: bisect_left's (the first) entry decides
        {"recent_txn_ts": [], "recent_amounts": [], "recent_merchants": [],
         "known_merchants": ["a", "a", "b"], "known_merchant_first_ts": [t + 1, t - 1, t - 1]},
    ]
    rows = [{**c, "request_ts_us": t, "txn_merchant_id": m}
            for c in cases for m in (None, "a", "b", "c", "zz")]
    table = pa.Table.from_pylist(rows, schema=VELOCITY_SCHEMA)
    _assert_same(velocity_twin(table), _udf("user_velocity_odfv", table))
    assert velocity_twin(table.slice(0, 0)) is None  # the UDF's output is null-typed
    chunked = pa.concat_tables([table.slice(0, 7), table.slice(7)])  # several Arrow chunks
    _assert_same(velocity_twin(chunked), _udf("user_velocity_odfv", table))


def test_velocity_twin_skips_values_under_null_lists() -> None:
    """Arrow lets a null list span values; they are not part of the row (the UDF sees None)."""
    t, mask = T0, pa.array([False, True, False])
    offsets = pa.array([0, 2, 3, 4], pa.int32())

    def lists(values: list[Any], kind: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values, kind), mask=mask)

    table = pa.table({
        "recent_txn_ts": lists([t - 5, t - 3, t - 100, t - 1], pa.int64()),
        "recent_amounts": lists([1.0, 2.0, 4.0, 8.0], pa.float64()),
        "recent_merchants": lists(["a", "b", "c", "a"], pa.string()),
        "known_merchants": lists(["a", "b", "c", "a"], pa.string()),
        "known_merchant_first_ts": lists([t - 5, t - 3, t - 100, t], pa.int64()),
        "request_ts_us": pa.array([t, t, t]), "txn_merchant_id": pa.array(["a", "c", "a"]),
    })
    assert table["recent_txn_ts"].to_pylist()[1] is None
    _assert_same(velocity_twin(table), _udf("user_velocity_odfv", table))


def _replace(table: pa.Table, name: str, rows: list[Any], kind: pa.DataType) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(rows, kind))


def test_velocity_twin_declines_what_it_does_not_reproduce() -> None:
    table = _velocity_table(0, 50)
    ts = table["recent_txn_ts"].to_pylist()
    k = next(i for i, v in enumerate(ts) if v and len(v) > 1)
    unsorted = [list(v) if v else v for v in ts]
    unsorted[k] = unsorted[k][::-1]
    assert velocity_twin(_replace(table, "recent_txn_ts", unsorted, pa.list_(pa.int64()))) is None
    merchants = table["recent_merchants"].to_pylist()
    merchants[k] = [None, *merchants[k][1:]]
    assert velocity_twin(
        _replace(table, "recent_merchants", merchants, pa.list_(pa.string()))) is None
    amounts = table["recent_amounts"].to_pylist()
    amounts[k] = amounts[k][1:]  # shorter than its times
    assert velocity_twin(_replace(table, "recent_amounts", amounts, pa.list_(pa.float64()))) is None
    as_float = table["request_ts_us"].cast(pa.float64())
    assert velocity_twin(table.set_column(5, "request_ts_us", as_float)) is None


@pytest.mark.parametrize("seed", range(4))
def test_transaction_twin_equals_the_udf(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    special = [None, np.nan, 0.0, -0.0, -3.0, 1e-300, 5e-324, 1e300, np.inf]

    def with_specials(out: list[Any]) -> list[Any]:
        for i in rng.integers(0, n, n // 5):
            out[i] = special[int(rng.integers(len(special)))]
        return out

    def values(scale: float) -> list[Any]:
        return with_specials(list(np.round(rng.lognormal(np.log(scale), 1, n), 4)))
    # whole hours (+-1 us) and points inside them: fractional local hours and gaps
    hours = rng.integers(-30 * 24, 60 * 24, n) * HOUR_US + rng.choice(
        [0, 0, HOUR_US // 2, int(rng.integers(HOUR_US))], n)
    table = pa.table({
        "txn_amount": [float(x) for x in rng.choice(
            [*np.round(rng.lognormal(3, 2, 50), 2), 0.0, -0.0, 1e-9, np.nan, np.inf], n)],
        "txn_channel": rng.choice(["online", "atm", "pos", "", "ONLINE", None], n).tolist(),
        "request_ts_us": (T0 + hours + rng.choice([0, -1, 1, 123], n)).tolist(),
        "user_amount_mean_30d": values(50), "user_amount_std_30d": values(20),
        "user_utc_offset_hours": with_specials(
            [float(x) for x in rng.choice([-12.0, -8.0, -0.0, 0.0, 1.0, 5.5, 9.0, 14.0], n)]),
        "user_usual_hour_30d": with_specials(
            [float(x) for x in rng.choice([0.0, 12.0, 23.999999, rng.uniform(0, 24)], n)]),
    }, schema=TRANSACTION_SCHEMA)
    _assert_same(transaction_twin(table), _udf("transaction_odfv", table))
    negative = table.set_column(2, "request_ts_us", pa.array(-np.arange(n) * 7 * MINUTE_US))
    _assert_same(transaction_twin(negative), _udf("transaction_odfv", negative))


def test_twins_are_bound_to_the_registered_source_text() -> None:
    assert twin_for(definitions.user_velocity_odfv) is velocity_twin
    assert twin_for(definitions.transaction_odfv) is transaction_twin
    changed = copy.copy(definitions.transaction_odfv)
    changed.feature_transformation = copy.copy(changed.feature_transformation)
    changed.feature_transformation.udf_string += "\n# edited"
    assert twin_for(changed) is None  # a re-defined view runs its own UDF
