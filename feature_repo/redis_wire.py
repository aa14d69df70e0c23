"""Column-at-a-time encoding of feature rows into the bytes Feast's RedisOnlineStore writes.

For a batch of rows this produces, with numpy/pyarrow kernels instead of protobuf objects per
value, exactly what `RedisOnlineStore.online_write_batch` stores, already framed as Redis
protocol bulk strings (`$<length>\\r\\n<bytes>\\r\\n`) so a batch is sent without building a
Python object per argument:

* the key: `serialize_entity_key(entity key, version) + project`;
* the field `_ts:<view>`: a serialized `google.protobuf.Timestamp` of the event time (whole
  microseconds, as the stock path keeps them);
* per feature, the field `mmh3("<view>:<feature>")` (4 bytes, little endian) holding the
  serialized `ValueProto`, or b"" when the value is null (NaN counts as null for scalar floats,
  as in `feast.type_map`).

int32/int64/float/double/bool/string values and their lists are encoded here straight from the
Arrow buffers; anything else goes through `feast.type_map.python_values_to_proto_values`, the
stock conversion.  `tests/test_materialization_engine.py` checks both agree with Feast byte for
byte.

How: every row's bytes are a sequence of tokens (constants, varints, decimal lengths, fixed-size
values) assembled for all rows at once as numpy matrices, interleaved with variable-length
payloads (string bytes, packed lists) by one Arrow `binary_join_element_wise`.

For reading the same layout back without Feast's per-key protobuf work: `string_key_encoder`
(the Redis key of a single string entity key) and `to_python` (a stored ValueProto as Python).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values
from feast.value_type import ValueType

V = ValueType
_EMPTY = pa.scalar(b"", pa.binary())
_CRLF = b"\r\n"
_MAX_EXACT_FLOAT_INT = 2**53
_INT32 = (pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint16())
_INT64 = (*_INT32, pa.int64(), pa.uint32())
_STRINGS = (pa.string(), pa.large_string(), pa.string_view())
# scalar value type -> (ValueProto field tag, accepted Arrow types)
_SCALARS = {
    V.INT32.value: (b"\x18", _INT32),
    V.INT64.value: (b"\x20", _INT64),
    V.FLOAT.value: (b"\x35", (pa.float32(),)),
    V.DOUBLE.value: (b"\x29", (pa.float64(),)),
    V.BOOL.value: (b"\x38", (pa.bool_(),)),
    V.STRING.value: (b"\x12", _STRINGS),
}
# list value type -> (ValueProto field tag, accepted item types, packing)
_LISTS = {
    V.INT32_LIST.value: (b"\x6a", _INT32, "varint"),
    V.INT64_LIST.value: (b"\x72", _INT64, "varint"),
    V.DOUBLE_LIST.value: (b"\x7a", (pa.float64(),), "fixed"),
    V.FLOAT_LIST.value: (b"\x82\x01", (pa.float32(),), "fixed"),
    V.STRING_LIST.value: (b"\x62", _STRINGS, "string"),
}


def field_name(view_name: str, feature: str) -> bytes:
    """The hash field of a feature, as Feast's `_mmh3` computes it (murmur3_32, little endian)."""
    return struct.pack("<I", mmh3.hash(f"{view_name}:{feature}", signed=False))


# --- numpy building blocks --------------------------------------------------------------------

def _binary(offsets: np.ndarray, data: np.ndarray | pa.Buffer) -> pa.Array:
    buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(np.ascontiguousarray(data))
    offs = np.ascontiguousarray(offsets, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), len(offs) - 1, [None, pa.py_buffer(offs), buf])


def _offsets(arr: pa.Array) -> np.ndarray:
    """The n + 1 value offsets of a binary array (int64)."""
    raw = np.frombuffer(arr.buffers()[1], dtype=np.int32)
    return raw[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)


def _data(arr: pa.Array) -> pa.Buffer:
    return arr.buffers()[2] or pa.py_buffer(b"")


def _as_binary(arr: pa.Array) -> pa.Array:
    """A string/binary array as `binary` (32-bit offsets), nulls as empty values."""
    out = arr.cast(pa.string()).cast(pa.binary()) if arr.type in _STRINGS else arr
    return out.fill_null(_EMPTY) if out.null_count else out


def _varint(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf base-128 varints of int64 values: a (width, n) byte matrix and the sizes."""
    u = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    size = _varint_size(values)
    width = int(size.max()) if len(u) else 1
    m = np.empty((width, len(u)), dtype=np.uint8)
    rest = u.copy()
    for k in range(width):
        np.bitwise_and(rest, 0x7F, out=m[k], casting="unsafe")
        m[k] |= np.where(size - 1 > k, 0x80, 0).astype(np.uint8)  # continuation bit
        rest >>= np.uint64(7)
    return m, size


def _varint_size(values: np.ndarray) -> np.ndarray:
    size = np.ones(len(values), dtype=np.int64)
    rest = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64) >> np.uint64(7)
    while rest.any():
        size += rest != 0
        rest >>= np.uint64(7)
    return size


def _decimal(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _row_major(m: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The used bytes of a (width, n) token matrix, row after row."""
    used = np.arange(m.shape[0]) < size[:, None]
    rows = np.empty(used.shape, dtype=np.uint8)
    rows[:] = m.T
    return np.compress(used.reshape(-1), rows.reshape(-1))


class _Rows:
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
        self.tokens(*_varint(values), where)

    def bulk_header(self, length: np.ndarray) -> None:
        """`$<length>\\r\\n`, the start of a Redis bulk string."""
        self.const(b"$")
        self.tokens(*_decimal(length))
        self.const(_CRLF)

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
        self.parts.append(_binary(offsets, data))
        self.blocks, self.sizes = [], []

    def build(self) -> pa.Array:
        self._flush()
        if len(self.parts) == 1:
            return self.parts[0]
        return pc.binary_join_element_wise(*self.parts, _EMPTY)


def _constant(data: bytes, n: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(data, dtype=np.uint8)[:, None], (len(data), n))


# --- values -------------------------------------------------------------------------------------

def _int_exact(arr: pa.Array) -> bool:
    """Whether the stock path (nulls -> float64 -> int) keeps every value of `arr` exact."""
    if arr.null_count == 0 or arr.null_count == len(arr):
        return True
    bound = pc.max(pc.abs(arr)).as_py()
    return bound is not None and bound <= _MAX_EXACT_FLOAT_INT


def _valid(arr: pa.Array) -> np.ndarray | None:
    """Which rows are not null; None when all are (so tokens can stay unconditional)."""
    return np.asarray(arr.is_valid()) if arr.null_count else None


def _masked(values: np.ndarray, where: np.ndarray | None) -> np.ndarray:
    return values if where is None else np.where(where, values, 0)


def _scalar(rows: _Rows, arr: pa.Array, tag: bytes) -> None:
    t = arr.type
    valid = _valid(arr)
    if t in _STRINGS:
        data = _as_binary(arr)
        length = np.asarray(pc.binary_length(data), dtype=np.int64)
        lm, ls = _varint(length)
        rows.bulk_header(_masked(len(tag) + ls + length, valid))
        rows.const(tag, valid)
        rows.tokens(lm, ls, valid)
        rows.payload(data)
        return
    if t == pa.bool_():
        m = np.asarray(arr.fill_null(False), dtype=np.uint8)[None, :]
        size = None
    elif pa.types.is_floating(t):
        values = np.asarray(arr.fill_null(0))
        nan = np.isnan(values)
        if nan.any():  # NaN is null for Feast's scalar conversion
            valid = ~nan if valid is None else valid & ~nan
        m = values.astype(values.dtype.newbyteorder("<")).view(np.uint8).reshape(len(arr), -1).T
        size = None
    else:
        m, size = _varint(np.asarray(arr.fill_null(0), dtype=np.int64))
    length = len(tag) + (np.full(len(arr), m.shape[0]) if size is None else size)
    rows.bulk_header(_masked(length, valid))
    rows.const(tag, valid)
    rows.tokens(m, size, valid)


def _list(rows: _Rows, arr: pa.Array, tag: bytes, packing: str) -> None:
    valid = _valid(arr)
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    base = int(offsets[0])
    rel = offsets - base
    items = arr.values.slice(base, int(offsets[-1]) - base)
    if packing == "string":
        elements = _Rows(len(items))
        data = _as_binary(items)
        elements.const(b"\x0a")
        elements.varint(np.asarray(pc.binary_length(data), dtype=np.int64))
        elements.payload(data)
        encoded = elements.build()
        item_offsets = _offsets(encoded)
        payload = _binary(item_offsets[rel] - item_offsets[0], _data(encoded))
    elif packing == "varint":
        m, size = _varint(np.asarray(items, dtype=np.int64))
        item_offsets = np.zeros(len(size) + 1, dtype=np.int64)
        np.cumsum(size, out=item_offsets[1:])
        payload = _binary(item_offsets[rel], _row_major(m, size))
    else:
        values = np.asarray(items)
        raw = values.astype(values.dtype.newbyteorder("<")).view(np.uint8)
        payload = _binary(rel * values.itemsize, raw)
    plen = _masked(np.diff(_offsets(payload)), valid)
    if packing == "string":
        inner = plen  # repeated strings are not packed: the payload is the message itself
        framed = np.zeros(len(arr), dtype=bool)
    else:
        framed = plen > 0  # an empty packed list is an empty message
        inner = np.where(framed, 1 + _varint_size(plen) + plen, 0)
    rows.bulk_header(_masked(len(tag) + _varint_size(inner) + inner, valid))
    rows.const(tag, valid)
    rows.varint(inner, valid)
    rows.const(b"\x0a", framed)
    rows.varint(plen, framed)
    rows.payload(payload if valid is None else pc.if_else(pa.array(valid), payload, _EMPTY))


def _fallback(rows: _Rows, arr: pa.Array, value_type: int) -> None:
    protos = python_values_to_proto_values(arr.to_numpy(zero_copy_only=False),
                                           ValueType(value_type))
    data = pa.array([p.SerializeToString() for p in protos], pa.binary())
    rows.bulk_header(np.asarray(pc.binary_length(data), dtype=np.int64))
    rows.payload(data)


def _value_column(rows: _Rows, arr: pa.Array | pa.ChunkedArray, value_type: int) -> None:
    """Appends one bulk string per row: the serialized ValueProto, b"" when null."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if value_type in _SCALARS:
        tag, types = _SCALARS[value_type]
        if arr.type in types and (not pa.types.is_integer(arr.type) or _int_exact(arr)):
            _scalar(rows, arr, tag)
            rows.const(_CRLF)
            return
    elif value_type in _LISTS and (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        tag, types, packing = _LISTS[value_type]
        if arr.type.value_type in types and arr.values.null_count == 0:
            _list(rows, arr, tag, packing)
            rows.const(_CRLF)
            return
    _fallback(rows, arr, value_type)
    rows.const(_CRLF)


def _timestamp_column(rows: _Rows, micros: np.ndarray) -> None:
    """Appends the serialized google.protobuf.Timestamp of each time (us since the epoch)."""
    seconds, rest = np.divmod(np.asarray(micros, dtype=np.int64), 1_000_000)
    nanos = rest * 1000
    sm, ss = _varint(seconds)
    nm, ns = _varint(nanos)
    has_s, has_n = seconds != 0, nanos != 0
    rows.bulk_header(has_s * (1 + ss) + has_n * (1 + ns))
    rows.const(b"\x08", has_s)
    rows.tokens(sm, ss, has_s)
    rows.const(b"\x10", has_n)
    rows.tokens(nm, ns, has_n)
    rows.const(_CRLF)


# --- keys ---------------------------------------------------------------------------------------

def _key_prefix(names: Sequence[str], version: int) -> bytes:
    out = struct.pack("<I", len(names)) if version > 2 else b""
    for name in names:
        raw = name.encode()
        out += struct.pack("<I", V.STRING.value)
        out += (struct.pack("<I", len(raw)) if version > 2 else b"") + raw
    return out


def _key_column(rows: _Rows, columns: Sequence[pa.Array], join_keys: Sequence[tuple[str, int]],
                project: str, version: int) -> None:
    """Appends one bulk string per row: `serialize_entity_key(...) + project` (no null keys)."""
    order = sorted(range(len(join_keys)), key=lambda i: join_keys[i][0])
    cols = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns]
    if not all(_fast_key(cols[i], join_keys[i][1]) for i in order):
        data = _keys_one_by_one(cols, join_keys, project, version)
        rows.bulk_header(np.asarray(pc.binary_length(data), dtype=np.int64))
        rows.payload(data)
        rows.const(_CRLF)
        return
    prefix = _key_prefix([join_keys[i][0] for i in order], version)
    length = np.full(rows.n, len(prefix) + len(project.encode()), dtype=np.int64)
    pieces: list[tuple[int, pa.Array | np.ndarray]] = []
    for i in order:
        value_type = join_keys[i][1]
        if value_type == V.STRING.value:
            data = _as_binary(cols[i])
            pieces.append((value_type, data))
            length += 8 + np.asarray(pc.binary_length(data), dtype=np.int64)
        else:
            width, dtype = (8, "<i8") if value_type == V.INT64.value else (4, "<i4")
            raw = np.asarray(cols[i], dtype=np.int64).astype(dtype).view(np.uint8)
            pieces.append((value_type, raw.reshape(-1, width).T))
            length += 8 + width
    rows.bulk_header(length)
    rows.const(prefix)
    for value_type, piece in pieces:
        if isinstance(piece, np.ndarray):
            rows.const(struct.pack("<II", value_type, piece.shape[0]))
            rows.tokens(piece, None)
        else:
            size = np.asarray(pc.binary_length(piece), dtype="<u4")
            rows.const(struct.pack("<I", value_type))
            rows.tokens(size.view(np.uint8).reshape(-1, 4).T, None)
            rows.payload(piece)
    rows.const(project.encode() + _CRLF)


def _fast_key(arr: pa.Array, value_type: int) -> bool:
    if value_type == V.STRING.value:
        return arr.type in _STRINGS
    return value_type in (V.INT32.value, V.INT64.value) and arr.type in _SCALARS[value_type][1]


def _keys_one_by_one(columns: Sequence[pa.Array], join_keys: Sequence[tuple[str, int]],
                     project: str, version: int) -> pa.Array:
    protos = [python_values_to_proto_values(c.to_numpy(zero_copy_only=False), ValueType(t))
              for c, (_, t) in zip(columns, join_keys, strict=True)]
    names = [k for k, _ in join_keys]
    return pa.array([
        serialize_entity_key(EntityKeyProto(join_keys=names, entity_values=list(values)),
                             entity_key_serialization_version=version) + project.encode()
        for values in zip(*protos, strict=True)
    ], pa.binary())


# --- batches ------------------------------------------------------------------------------------

def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


@dataclass
class EncodedRows:
    """A batch as Redis protocol: one bulk string per key, one run of bulk strings per row."""

    keys: pa.Array
    values: pa.Array
    values_per_row: int

    def script_calls(self, script: bytes, header: Sequence[bytes],
                     keys_per_call: int) -> Iterator[bytes]:
        """`EVAL script n key... header... values...` commands of at most `keys_per_call` keys."""
        key_offsets, value_offsets = _offsets(self.keys), _offsets(self.values)
        key_data = memoryview(_data(self.keys))
        value_data = memoryview(_data(self.values))
        head = b"".join(_bulk(h) for h in header)
        for start in range(0, len(self.keys), keys_per_call):
            end = min(start + keys_per_call, len(self.keys))
            n = end - start
            count = 3 + n + len(header) + n * self.values_per_row
            yield b"".join([
                b"*%d\r\n$4\r\nEVAL\r\n" % count, _bulk(script), _bulk(b"%d" % n),
                key_data[key_offsets[start]:key_offsets[end]], head,
                value_data[value_offsets[start]:value_offsets[end]],
            ])


@dataclass
class RowEncoder:
    """Encodes batches of (join keys + features, event time) for one feature view."""

    project: str
    view_name: str
    join_keys: Sequence[tuple[str, int]]
    features: Sequence[tuple[str, int]]
    key_serialization_version: int

    def header(self, *, ttl: int, force: bool) -> list[bytes]:
        """The script's leading ARGV: ts field, feature count, TTL, force flag, field names."""
        return [f"_ts:{self.view_name}".encode(), b"%d" % len(self.features), b"%d" % ttl,
                b"1" if force else b"0",
                *(field_name(self.view_name, name) for name, _ in self.features)]

    def encode(self, batch: pa.RecordBatch | pa.Table, micros: np.ndarray) -> EncodedRows:
        keys = _Rows(batch.num_rows)
        _key_column(keys, [batch.column(k) for k, _ in self.join_keys], self.join_keys,
                    self.project, self.key_serialization_version)
        values = _Rows(batch.num_rows)
        _timestamp_column(values, micros)
        for name, value_type in self.features:
            _value_column(values, batch.column(name), value_type)
        return EncodedRows(keys=keys.build(), values=values.build(),
                           values_per_row=1 + len(self.features))


# --- reading ------------------------------------------------------------------------------------

_SCALAR_KINDS = frozenset({"int32_val", "int64_val", "float_val", "double_val", "string_val",
                      "bool_val", "bytes_val"})
_LIST_KINDS = frozenset({"int32_list_val", "int64_list_val", "float_list_val", "double_list_val",
                    "string_list_val", "bool_list_val", "bytes_list_val"})


def to_python(value: Value) -> Any:
    """`feast_value_type_to_python_type`, with the plain scalar and list kinds inlined (the
    hot path's only kinds); every other kind goes through Feast's own function."""
    kind = value.WhichOneof("val")
    if kind is None:
        return None
    if kind in _SCALAR_KINDS:
        return getattr(value, kind)
    if kind in _LIST_KINDS:
        return list(getattr(value, kind).val)
    return feast_value_type_to_python_type(value)


def string_key_encoder(join_key: str, version: int, project: bytes
                       ) -> Callable[[str], bytes] | None:
    """`value -> serialize_entity_key(one string key) + project` without building protos.

    Feast's serialization of a single string key ends with the value's length (uint32 LE) and
    its UTF-8 bytes; the part before is constant per join key, taken from Feast's own function.
    The encoder is returned only if it reproduces that function on probe values (else None:
    the caller serializes through Feast)."""
    def feast_key(value: str) -> bytes:
        proto = EntityKeyProto(join_keys=[join_key], entity_values=[Value(string_val=value)])
        return serialize_entity_key(proto, entity_key_serialization_version=version) + project

    head = feast_key("")[: -len(project) - 4 if project else -4]
    pack = struct.Struct("<I").pack

    def encode(value: str) -> bytes:
        raw = value.encode()
        return head + pack(len(raw)) + raw + project

    probes = ("u_1", "", "ü-ß-✓", "x" * 300)
    return encode if all(encode(p) == feast_key(p) for p in probes) else None
