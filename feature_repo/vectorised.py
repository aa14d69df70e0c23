"""Vectorised twins of the python-mode on-demand views, used only by offline retrieval.

The python UDFs in `feature_repo.definitions` stay the single definition: the online scorer
runs them, and offline retrieval (`feature_repo.offline_store`) runs them too whenever a twin
declines.  A twin computes the same columns over a whole Arrow table with NumPy, bit for bit
equal to the UDF on every input it accepts (tests/unit/feature_repo/test_vectorised.py compares both on random and
edge-case tables), and returns None (declines) on anything it does not reproduce exactly:
other column types, nulls where the UDF would raise, lists that are not sorted as the writer
keeps them, parallel lists of different lengths, values near the int64 limits, empty tables,
and (velocity) any Python from 3.12 on, whose `sum` of floats is compensated.

`twin_for(odfv)` hands out a twin only for a view whose registered source text is the one in
`feature_repo.definitions`, so a re-defined view is never computed by a stale twin.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_repo.transforms import TRANSACTION_FEATURES, US_PER_DAY, US_PER_HOUR
from feature_repo.velocity import HORIZON_US, HOUR_US, MINUTE_US, WINDOW_FEATURES

Twin = Callable[[pa.Table], "pa.Table | None"]
_LIMIT = 2**62  # |times| below this: t - 24h and t - ts cannot overflow int64


def _col(table: pa.Table, name: str, kind: pa.DataType) -> pa.Array | None:
    """`name` as one array of exactly `kind` (string flavours accepted as string), or None."""
    col = table[name]
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if arr.type == kind:
        return arr
    strings = (pa.string(), pa.large_string(), pa.string_view())
    if kind == pa.string() and arr.type in strings:
        return arr.cast(pa.string())
    if pa.types.is_list(kind) and kind.value_type == pa.string() and (
        pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
    ) and arr.type.value_type in strings:
        return arr.cast(kind)
    return None


def _flat(lists: pa.Array) -> tuple[pa.Array, np.ndarray] | None:
    """(values, length of each list with null as empty); None if a value is null (the UDF
    would raise or compare None).  Row i's values follow row i-1's."""
    offsets = lists.offsets.to_numpy()
    lengths = np.diff(offsets)
    valid = lists.is_valid().to_numpy(zero_copy_only=False)
    if lengths[~valid].any():  # a null list over values: let Arrow drop them
        values = pc.list_flatten(lists)
        lengths = pc.list_value_length(lists).fill_null(0).to_numpy()
    else:
        values = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
    return None if values.null_count else (values, lengths)


def _ranks(values: pa.Array) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Integer codes of strings, in the order Python sorts them (UTF-8 byte order): (code of
    each value, distinct strings, code of each distinct string)."""
    encoded = pc.dictionary_encode(values)
    rank = np.empty(len(encoded.dictionary), dtype=np.int64)
    rank[pc.sort_indices(encoded.dictionary).to_numpy()] = np.arange(len(rank))
    return rank[encoded.indices.to_numpy()], encoded.dictionary, rank


def _sorted_within_rows(values: np.ndarray, parent: np.ndarray) -> bool:
    return not ((parent[1:] == parent[:-1]) & (values[1:] < values[:-1])).any()


def _sequential_sums(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per-row left-to-right float sums (Python's `sum` up to 3.11); `rows` nondecreasing."""
    acc = np.zeros(n, dtype=np.float64)
    if not len(rows):
        return acc
    starts = np.r_[0, np.flatnonzero(rows[1:] != rows[:-1]) + 1]
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    order = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[order], np.arange(rank.max() + 2))
    for k in range(rank.max() + 1):
        pick = order[bounds[k]:bounds[k + 1]]  # the k-th term of each row: distinct rows
        acc[rows[pick]] += values[pick]
    return acc


def velocity_twin(table: pa.Table) -> pa.Table | None:
    """`user_velocity_odfv` (feature_repo.velocity.window_features) over a whole table."""
    if sys.version_info >= (3, 12) or not len(table):
        return None  # sum() of floats is compensated from 3.12 on; this reproduces 3.11's
    cols = {
        "ts": _col(table, "recent_txn_ts", pa.list_(pa.int64())),
        "amounts": _col(table, "recent_amounts", pa.list_(pa.float64())),
        "merchants": _col(table, "recent_merchants", pa.list_(pa.string())),
        "known": _col(table, "known_merchants", pa.list_(pa.string())),
        "first": _col(table, "known_merchant_first_ts", pa.list_(pa.int64())),
        "t": _col(table, "request_ts_us", pa.int64()),
        "merchant": _col(table, "txn_merchant_id", pa.string()),
    }
    if any(v is None for v in cols.values()) or cols["t"].null_count:  # type: ignore[union-attr]
        return None
    flats = {k: _flat(cols[k]) for k in ("ts", "amounts", "merchants", "known", "first")}
    if any(f is None for f in flats.values()):
        return None
    ts_v, ts_len = flats["ts"]  # type: ignore[misc]
    known_v, known_len = flats["known"]  # type: ignore[misc]
    if not (np.array_equal(ts_len, flats["amounts"][1])  # type: ignore[index]
            and np.array_equal(ts_len, flats["merchants"][1])  # type: ignore[index]
            and np.array_equal(known_len, flats["first"][1])):  # type: ignore[index]
        return None
    n = len(table)
    par = np.repeat(np.arange(n), ts_len)  # the row of each event
    kpar = np.repeat(np.arange(n), known_len)  # the row of each known merchant
    t = cols["t"].to_numpy()  # type: ignore[union-attr]
    ts = ts_v.to_numpy()
    if (np.abs(t) >= _LIMIT).any() or (np.abs(ts) >= _LIMIT).any():
        return None
    known, names, rank = _ranks(known_v)
    if not (_sorted_within_rows(ts, par) and _sorted_within_rows(known, kpar)):
        return None
    te = t[par]  # each event's request time

    def count_before(offset: int) -> np.ndarray:
        return np.bincount(par[ts < te - offset], minlength=n)

    end = count_before(0)
    in_1h = (ts >= te - HOUR_US) & (ts < te)
    in_24h = (ts >= te - HORIZON_US) & (ts < te)
    amounts = flats["amounts"][0].to_numpy()  # type: ignore[index]
    codes = pc.dictionary_encode(flats["merchants"][0]).indices.to_numpy()  # type: ignore[index]
    width = int(codes.max(initial=0)) + 1
    pairs = np.sort(par[in_24h] * width + codes[in_24h])  # (row, merchant) of each event
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs
    distinct = np.bincount(pairs // width, minlength=n)
    row_start = np.searchsorted(par, np.arange(n))
    last = np.zeros(n, np.int64)
    if len(ts):
        last = ts[np.clip(row_start + end - 1, 0, len(ts) - 1)]  # garbage where end == 0
    with np.errstate(invalid="ignore"):
        since = np.where(end > 0, (t - last).astype(np.float64) / 1e6, math.nan)
    wanted = pc.index_in(cols["merchant"], value_set=names).fill_null(-1).to_numpy()
    wanted = np.where(wanted >= 0, rank[np.maximum(wanted, 0)], -1)  # null/unknown: -1
    hit = np.flatnonzero(known == wanted[kpar])
    hit_rows = kpar[hit]  # nondecreasing: the first hit of a row is bisect_left's
    first_hit = np.flatnonzero(np.r_[True, hit_rows[1:] != hit_rows[:-1]]) if len(hit) else hit
    rows = hit_rows[first_hit]
    first_ts = flats["first"][0].to_numpy()[hit[first_hit]]  # type: ignore[index]
    is_new = np.ones(n, dtype=np.int64)
    is_new[rows] = (first_ts >= t[rows]).astype(np.int64)
    values = [
        end - count_before(10 * MINUTE_US),
        end - count_before(HOUR_US),
        _sequential_sums(par[in_1h], amounts[in_1h], n),
        distinct.astype(np.int64),
        since,
        is_new,
    ]
    return pa.table(dict(zip(WINDOW_FEATURES, values, strict=True)))


def transaction_twin(table: pa.Table) -> pa.Table | None:
    """`transaction_odfv` (feature_repo.transforms.transaction_features) over a whole table."""
    if not len(table):
        return None  # the UDF's empty output has null-typed columns
    amount = _col(table, "txn_amount", pa.float64())
    channel = _col(table, "txn_channel", pa.string())
    t = _col(table, "request_ts_us", pa.int64())
    profile = [_col(table, name, pa.float64()) for name in (
        "user_amount_mean_30d", "user_amount_std_30d", "user_utc_offset_hours",
        "user_usual_hour_30d")]
    if amount is None or channel is None or t is None or any(c is None for c in profile):
        return None
    if amount.null_count or t.null_count:
        return None
    a = amount.to_numpy()
    # null -> NaN: "missing" either way
    m, s, offset, usual = (c.to_numpy(zero_copy_only=False) for c in profile)  # type: ignore[union-attr]
    hour = (t.to_numpy() % US_PER_DAY) / US_PER_HOUR  # int64 -> float64 exactly, as the UDF
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        has_mean = ~np.isnan(m) & (m > 0)
        has_std = has_mean & ~np.isnan(s) & (s > 0)
        to_mean = np.where(has_mean, a / m, math.nan)
        zscore = np.where(has_std, (a - m) / s, math.nan)
        local = np.where(~np.isfinite(offset), math.nan, (hour + offset + 24.0) % 24.0)
        gap = np.abs(hour - usual)
        from_usual = np.where(~np.isfinite(usual), math.nan, np.minimum(gap, 24.0 - gap))

    def is_channel(name: str) -> np.ndarray:
        return pc.equal(channel, name).fill_null(False).to_numpy(zero_copy_only=False)

    values = [
        np.array([math.log1p(x) for x in a.tolist()], dtype=np.float64),  # libm's, as the UDF
        to_mean,
        zscore,
        local,
        from_usual,
        is_channel("online").astype(np.int64),
        is_channel("atm").astype(np.int64),
    ]
    return pa.table(dict(zip(TRANSACTION_FEATURES, values, strict=True)))


TWINS: dict[str, Twin] = {"user_velocity_odfv": velocity_twin, "transaction_odfv": transaction_twin}


def twin_for(odfv: object) -> Twin | None:
    """The twin of a registered on-demand view, if its UDF is the one defined in this repo."""
    # At first use, not import: importing the definitions builds the Feast objects and reads
    # the data directory (the offline store that imports this module is loaded by Feast).
    from feature_repo import definitions

    name = getattr(odfv, "name", None)
    if name not in TWINS or getattr(odfv, "mode", None) != "python":
        return None
    ours = getattr(definitions, name).feature_transformation.udf_string
    theirs = getattr(getattr(odfv, "feature_transformation", None), "udf_string", None)
    return TWINS[name] if theirs == ours else None
