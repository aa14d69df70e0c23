"""Byte strings for every row of a batch, built column by column with numpy (no per-row Python).

A row's bytes are a sequence of tokens (constants, varints, decimal lengths, fixed-size values)
assembled for all rows at once as numpy matrices, interleaved with variable-length payloads
(string bytes, packed lists) by one Arrow `binary_join_element_wise`.  `RowBytes` is the
builder; the rest are its numpy building blocks.  Internal to `feature_repo.redis_store`
(`encode` uses it to produce Feast's Redis bytes).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EMPTY = pa.scalar(b"", pa.binary())
CRLF = b"\r\n"
STRINGS = (pa.string(), pa.large_string(), pa.string_view())


def binary_array(offsets: np.ndarray, data: np.ndarray | pa.Buffer) -> pa.Array:
    buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(np.ascontiguousarray(data))
    offs = np.ascontiguousarray(offsets, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), len(offs) - 1, [None, pa.py_buffer(offs), buf])


def offsets_of(arr: pa.Array) -> np.ndarray:
    """The n + 1 value offsets of a binary array (int64)."""
    raw = np.frombuffer(arr.buffers()[1], dtype=np.int32)
    return raw[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)


def buffer_of(arr: pa.Array) -> pa.Buffer:
    return arr.buffers()[2] or pa.py_buffer(b"")


def as_binary(arr: pa.Array) -> pa.Array:
    """A string/binary array as `binary` (32-bit offsets), nulls as empty values."""
    out = arr.cast(pa.string()).cast(pa.binary()) if arr.type in STRINGS else arr
    return out.fill_null(EMPTY) if out.null_count else out


def varint(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf base-128 varints of int64 values: a (width, n) byte matrix and the sizes.

    Every byte row at once (shifts broadcast over the rows), not a loop over them."""
    u = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    size = varint_size(values)
    width = int(size.max()) if len(u) else 1
    k = np.arange(width)
    m = (u >> (k.astype(np.uint64) * np.uint64(7))[:, None]).astype(np.uint8)
    m &= np.uint8(0x7F)
    m |= (k[:, None] < size - 1).view(np.uint8) << np.uint8(7)  # continuation bit
    return m, size


_VARINT_BOUNDS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)


def varint_size(values: np.ndarray) -> np.ndarray:
    """Bytes of each value's varint: 1 + how many of 2^7, 2^14 ... 2^63 it reaches (as
    uint64: a negative int64 takes 10)."""
    u = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    return np.searchsorted(_VARINT_BOUNDS, u, side="right").astype(np.int64) + 1


def decimal(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ASCII decimal of non-negative ints: a (width, n) byte matrix and the sizes."""
    v = np.asarray(values, dtype=np.int64)
    if len(v) and int(v.max()) < _SMALL:  # the usual case: a lookup
        table, sizes = _small_decimals()
        width = int(sizes[v].max())
        return table[:width, v], sizes[v]
    size = np.ones(len(v), dtype=np.int64)
    for bound in (10, 100, 1000, 10**4, 10**5, 10**6, 10**7, 10**8, 10**9):
        size += v >= bound
    width = int(size.max()) if len(v) else 1
    m = np.empty((width, len(v)), dtype=np.uint8)
    for k in range(width):
        m[k] = v // 10 ** np.maximum(size - 1 - k, 0) % 10 + 48
    return m, size


_SMALL = 10_000


@cache
def _small_decimals() -> tuple[np.ndarray, np.ndarray]:
    """The (4, 10000) ASCII digits of 0..9999 (left-aligned) and their lengths."""
    text = [str(i).encode() for i in range(_SMALL)]
    table = np.zeros((4, _SMALL), dtype=np.uint8)
    for i, t in enumerate(text):
        table[:len(t), i] = np.frombuffer(t, dtype=np.uint8)
    return table, np.array([len(t) for t in text], dtype=np.int64)


def row_major(m: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The used bytes of a (width, n) token matrix, row after row."""
    used = np.arange(m.shape[0]) < size[:, None]
    rows = np.empty(used.shape, dtype=np.uint8)
    rows[:] = m.T
    return np.compress(used.reshape(-1), rows.reshape(-1))


class RowBytes:
    """Per-row byte strings of a batch, appended column-wise.

    A token is a (width, n) byte matrix, byte k of every row in row k, plus how many leading
    bytes each row uses (None: all of them); `payload` appends a variable-length Arrow binary
    column.  Tokens between payloads are assembled in one numpy pass; `build` joins the parts
    into one binary value per row.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.parts: list[pa.Array] = []
        self.blocks: list[np.ndarray] = []
        self.sizes: list[np.ndarray | None] = []
        self.tail = b""  # unconditional constant bytes not yet added as a block

    def tokens(self, m: np.ndarray, size: np.ndarray | None,
               where: np.ndarray | None = None) -> None:
        self._const_block()
        self.blocks.append(m)
        if where is not None:
            size = np.where(where, m.shape[0] if size is None else size, 0)
        self.sizes.append(size)

    def const(self, data: bytes, where: np.ndarray | None = None) -> None:
        if where is None:
            self.tail += data
            return
        self.tokens(_constant(data, self.n), None, where)

    def varint(self, values: np.ndarray, where: np.ndarray | None = None) -> None:
        self.tokens(*varint(values), where)

    def bulk_header(self, length: np.ndarray) -> None:
        """`$<length>\\r\\n`, the start of a Redis bulk string."""
        self.const(b"$")
        self.tokens(*decimal(length))
        self.const(CRLF)

    def payload(self, arr: pa.Array) -> None:
        self._flush()
        self.parts.append(arr)

    def _const_block(self) -> None:
        if self.tail:
            self.blocks.append(_constant(self.tail, self.n))
            self.sizes.append(None)
            self.tail = b""

    def _flush(self) -> None:
        self._const_block()
        if not self.blocks:
            return
        width = sum(b.shape[0] for b in self.blocks)
        m = np.empty((width, self.n), dtype=np.uint8)
        used = np.empty(m.shape, dtype=bool)
        lengths = np.zeros(self.n, dtype=np.int64)
        start = 0
        for block, size in zip(self.blocks, self.sizes, strict=True):
            end = start + block.shape[0]
            m[start:end] = block
            if size is None:
                used[start:end] = True
                lengths += block.shape[0]
            else:
                np.less(np.arange(block.shape[0])[:, None], size, out=used[start:end])
                lengths += size
            start = end
        offsets = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        rows = np.empty((self.n, width), dtype=np.uint8)
        rows[:] = m.T  # row-major: a row's bytes are contiguous
        if all(s is None for s in self.sizes):
            data = rows.reshape(-1)
        else:
            row_used = np.empty(rows.shape, dtype=bool)
            row_used[:] = used.T
            data = np.compress(row_used.reshape(-1), rows.reshape(-1))
        self.parts.append(binary_array(offsets, data))
        self.blocks, self.sizes = [], []

    def build(self) -> pa.Array:
        self._flush()
        if len(self.parts) == 1:
            return self.parts[0]
        return pc.binary_join_element_wise(*self.parts, EMPTY)


def _constant(data: bytes, n: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(data, dtype=np.uint8)[:, None], (len(data), n))
