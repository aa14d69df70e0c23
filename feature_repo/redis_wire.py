"""Column-at-a-time encoding of feature rows into the bytes Feast's RedisOnlineStore stores.

For a batch of rows this produces, with numpy/pyarrow kernels instead of a protobuf object per
value, exactly what `RedisOnlineStore.online_write_batch` writes:

* the key: `serialize_entity_key(entity key, version) + project`;
* the field `_ts:<view>`: a serialized `google.protobuf.Timestamp` (whole microseconds, as the
  stock path keeps them);
* per feature, the field `mmh3("<view>:<feature>")` (4 bytes, little endian) holding the
  serialized `ValueProto`, or b"" when the value is null (NaN counts as null for floats, as in
  `feast.type_map`).

Common types (int32/int64/float/double/bool/string and their lists) are encoded directly from
Arrow buffers; anything else goes through `feast.type_map.python_values_to_proto_values`, the
stock conversion.  `tests/test_materialization_engine.py` checks the two agree byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType

V = ValueType
KEY_TYPES = {V.STRING.value, V.INT32.value, V.INT64.value}  # entity key types encoded here
_EMPTY = pa.scalar(b"", pa.binary())
_MAX_EXACT_FLOAT_INT = 2**53


def field_name(view_name: str, feature: str) -> bytes:
    """The hash field of a feature, as Feast's `_mmh3` computes it (murmur3_32, little endian)."""
    return struct.pack("<I", mmh3.hash(f"{view_name}:{feature}", signed=False))


def _binary(offsets: np.ndarray, data: np.ndarray | pa.Buffer) -> pa.BinaryArray:
    buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(np.ascontiguousarray(data))
    offs = np.ascontiguousarray(offsets, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), len(offs) - 1, [None, pa.py_buffer(offs), buf])


def _offsets(arr: pa.Array) -> np.ndarray:
    """The n + 1 value offsets of a binary array, as int64."""
    raw = np.frombuffer(arr.buffers()[1], dtype=np.int32)
    return raw[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)


def _fixed(rows: np.ndarray) -> pa.BinaryArray:
    """A binary array from a (n, width) uint8 matrix, one row per value."""
    n, width = rows.shape
    return _binary(np.arange(n + 1, dtype=np.int64) * width, rows.reshape(-1))


def _join(*parts: pa.Array | pa.Scalar | bytes) -> pa.Array:
    args = [pa.scalar(p, pa.binary()) if isinstance(p, bytes) else p for p in parts]
    return pc.binary_join_element_wise(*args, _EMPTY)


def varints(values: np.ndarray) -> pa.BinaryArray:
    """Protobuf base-128 varints of int64 values (negatives as 10-byte two's complement)."""
    u = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    size = np.ones(len(u), dtype=np.int64)
    rest = u >> np.uint64(7)
    while rest.any():
        size += rest != 0
        rest >>= np.uint64(7)
    width = int(size.max()) if len(u) else 1
    groups = np.empty((len(u), width), dtype=np.uint8)
    rest = u.copy()
    for k in range(width):
        groups[:, k] = rest & np.uint64(0x7F)
        rest >>= np.uint64(7)
    position = np.arange(width)
    groups |= np.where(position < size[:, None] - 1, 0x80, 0).astype(np.uint8)
    offsets = np.zeros(len(u) + 1, dtype=np.int64)
    np.cumsum(size, out=offsets[1:])
    return _binary(offsets, groups[position < size[:, None]])


def _length_prefixed(tag: bytes, payload: pa.Array) -> pa.Array:
    lengths = np.asarray(pc.binary_length(payload).fill_null(0), dtype=np.int64)
    return _join(tag, varints(lengths), payload)


def _nulls_empty(arr: pa.Array, encoded: pa.Array, extra_null: pa.Array | None = None) -> pa.Array:
    null = arr.is_null()
    if extra_null is not None:
        null = pc.or_(null, extra_null)
    if not pc.any(null).as_py():
        return encoded
    return pc.if_else(null, _EMPTY, encoded)


def _int_exact(arr: pa.Array) -> bool:
    """Whether the stock path (nulls -> float64 -> int) keeps every value of `arr` exact."""
    if arr.null_count == 0 or len(arr) == arr.null_count:
        return True
    bound = pc.max(pc.abs(arr)).as_py()
    return bound is not None and bound <= _MAX_EXACT_FLOAT_INT


_SIGNED_32 = (pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint16())
_SIGNED_64 = (*_SIGNED_32, pa.int64(), pa.uint32())
_STRINGS = (pa.string(), pa.large_string(), pa.string_view())
# value type -> (tag of the ValueProto field, accepted arrow types)
_SCALARS = {
    V.INT32.value: (b"\x18", _SIGNED_32),
    V.INT64.value: (b"\x20", _SIGNED_64),
    V.FLOAT.value: (b"\x35", (pa.float32(),)),
    V.DOUBLE.value: (b"\x29", (pa.float64(),)),
    V.BOOL.value: (b"\x38", (pa.bool_(),)),
    V.STRING.value: (b"\x12", _STRINGS),
}
# list value type -> (tag, accepted element types, packing: "varint" | "fixed" | "string")
_LISTS = {
    V.INT32_LIST.value: (b"\x6a", _SIGNED_32, "varint"),
    V.INT64_LIST.value: (b"\x72", _SIGNED_64, "varint"),
    V.DOUBLE_LIST.value: (b"\x7a", (pa.float64(),), "fixed"),
    V.FLOAT_LIST.value: (b"\x82\x01", (pa.float32(),), "fixed"),
    V.STRING_LIST.value: (b"\x62", _STRINGS, "string"),
}


def _scalar(arr: pa.Array, tag: bytes) -> pa.Array:
    t = arr.type
    if t in _STRINGS:
        return _nulls_empty(arr, _length_prefixed(tag, arr.cast(pa.string()).cast(pa.binary())))
    if t == pa.bool_():
        rows = np.empty((len(arr), 2), dtype=np.uint8)
        rows[:, 0] = tag[0]
        rows[:, 1] = np.asarray(arr.fill_null(False), dtype=np.uint8)
        return _nulls_empty(arr, _fixed(rows))
    if pa.types.is_floating(t):
        values = np.asarray(arr.fill_null(0))
        rows = np.empty((len(arr), 1 + values.itemsize), dtype=np.uint8)
        rows[:, 0] = tag[0]
        rows[:, 1:] = values.astype(values.dtype.newbyteorder("<")).view(np.uint8).reshape(
            len(arr), values.itemsize)
        return _nulls_empty(arr, _fixed(rows), pc.is_nan(arr.fill_null(0)))
    return _nulls_empty(arr, _join(tag, varints(np.asarray(arr.fill_null(0), dtype=np.int64))))


def _list(arr: pa.Array, tag: bytes, packing: str) -> pa.Array:
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    base = int(offsets[0])
    rel = offsets - base
    items = arr.values.slice(base, int(offsets[-1]) - base)
    if packing == "string":
        inner_items = _length_prefixed(b"\x0a", items.cast(pa.string()).cast(pa.binary()))
        item_offsets = _offsets(inner_items)
        inner = _binary(item_offsets[rel] - item_offsets[0], inner_items.buffers()[2])
        return _nulls_empty(arr, _length_prefixed(tag, inner))
    if packing == "varint":
        item_bytes = varints(np.asarray(items, dtype=np.int64))
        item_offsets = _offsets(item_bytes)
        payload = _binary(item_offsets[rel], item_bytes.buffers()[2])
    else:
        values = np.asarray(items)
        raw = values.astype(values.dtype.newbyteorder("<")).view(np.uint8)
        payload = _binary(rel * values.itemsize, raw)
    packed = _length_prefixed(b"\x0a", payload)
    inner = pc.if_else(pc.greater(pc.binary_length(payload), 0), packed, _EMPTY)
    return _nulls_empty(arr, _length_prefixed(tag, inner))


def encode_values(arr: pa.Array | pa.ChunkedArray, value_type: int) -> pa.Array:
    """Serialized ValueProto per value (b"" for nulls), as Feast's stock conversion makes it."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if value_type in _SCALARS:
        tag, types = _SCALARS[value_type]
        if arr.type in types and (not pa.types.is_integer(arr.type) or _int_exact(arr)):
            return _scalar(arr, tag)
    elif value_type in _LISTS and (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        tag, types, packing = _LISTS[value_type]
        if arr.type.value_type in types and arr.values.null_count == 0:
            return _list(arr, tag, packing)
    protos = python_values_to_proto_values(arr.to_numpy(zero_copy_only=False),
                                           ValueType(value_type))
    return pa.array([p.SerializeToString() for p in protos], pa.binary())


def encode_timestamps(micros: np.ndarray) -> pa.Array:
    """Serialized google.protobuf.Timestamp of each time (microseconds since the epoch, UTC)."""
    seconds, rest = np.divmod(np.asarray(micros, dtype=np.int64), 1_000_000)
    nanos = rest * 1000
    sec = pc.if_else(pa.array(seconds != 0), _join(b"\x08", varints(seconds)), _EMPTY)
    nan = pc.if_else(pa.array(nanos != 0), _join(b"\x10", varints(nanos)), _EMPTY)
    return _join(sec, nan)


def encode_keys(columns: Sequence[pa.Array], join_keys: Sequence[tuple[str, int]], project: str,
                version: int) -> pa.Array:
    """`serialize_entity_key(...) + project` per row; `columns` in `join_keys` order, no nulls."""
    order = sorted(range(len(join_keys)), key=lambda i: join_keys[i][0])
    prefix = struct.pack("<I", len(join_keys)) if version > 2 else b""
    for i in order:
        name = join_keys[i][0].encode()
        prefix += struct.pack("<I", V.STRING.value)
        prefix += (struct.pack("<I", len(name)) if version > 2 else b"") + name
    parts: list[pa.Array | bytes] = [prefix]
    for i in order:
        arr, value_type = columns[i], join_keys[i][1]
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if value_type == V.STRING.value and arr.type in _STRINGS:
            data = arr.cast(pa.string()).cast(pa.binary())
            lengths = np.asarray(pc.binary_length(data), dtype="<u4").view(np.uint8)
            parts += [struct.pack("<I", V.STRING.value), _fixed(lengths.reshape(-1, 4)), data]
        elif value_type in (V.INT64.value, V.INT32.value) and arr.type in _SCALARS[value_type][1]:
            width, dtype = (8, "<i8") if value_type == V.INT64.value else (4, "<i4")
            raw = np.asarray(arr, dtype=np.int64).astype(dtype).view(np.uint8)
            parts += [struct.pack("<II", value_type, width), _fixed(raw.reshape(-1, width))]
        else:
            return _keys_one_by_one(columns, join_keys, project, version)
    parts.append(project.encode())
    return _join(*parts)


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


def _resp_parts(arr: pa.Array) -> list[pa.Array | bytes]:
    """The pieces of `$<len>\\r\\n<bytes>\\r\\n`, the Redis protocol's bulk string."""
    lengths = pc.binary_length(arr).cast(pa.string()).cast(pa.binary())
    return [b"$", lengths, b"\r\n", arr, b"\r\n"]


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


@dataclass
class EncodedRows:
    """A batch packed as Redis protocol: one bulk string per key, one run per row's values."""

    keys: pa.BinaryArray
    values: pa.BinaryArray
    values_per_row: int

    def script_calls(self, script: bytes, header: Sequence[bytes],
                     keys_per_call: int) -> Iterator[bytes]:
        """`EVAL script n key... header... values...` commands of at most `keys_per_call` keys."""
        key_offsets = _offsets(self.keys)
        value_offsets = _offsets(self.values)
        key_data = memoryview(self.keys.buffers()[2])
        value_data = memoryview(self.values.buffers()[2])
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
        keys = encode_keys([batch.column(k) for k, _ in self.join_keys], self.join_keys,
                           self.project, self.key_serialization_version)
        parts = _resp_parts(encode_timestamps(micros))
        for name, value_type in self.features:
            parts += _resp_parts(encode_values(batch.column(name), value_type))
        return EncodedRows(keys=_join(*_resp_parts(keys)), values=_join(*parts),
                           values_per_row=1 + len(self.features))
