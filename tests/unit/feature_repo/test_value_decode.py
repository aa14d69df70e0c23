"""The online store's inlined codecs equal Feast's own (ValueProto decoding, also straight
from the bytes, entity-key encoding), and the one rule for a key never written (`redis_store.reader.never_written`)."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values
from feast.value_type import ValueType
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from feature_repo.redis_store.reader import (
    _VARINTS_MIN,
    EPOCH,
    HashReader,
    _double_lists,
    _row_micros,
    _varints,
    decode_column,
    never_written,
    python_value,
    row_times,
)
from feature_repo.redis_store.wire import key_encoder, string_key_encoder, to_python

CASES = [
    (ValueType.INT64, 7), (ValueType.INT32, -3), (ValueType.DOUBLE, 0.1), (ValueType.FLOAT, 2.5),
    (ValueType.STRING, "m_1"), (ValueType.BOOL, True), (ValueType.BYTES, b"\x00\xff"),
    (ValueType.DOUBLE_LIST, [1.5, -2.0]), (ValueType.INT64_LIST, [1, 2, 3]),
    (ValueType.STRING_LIST, ["a", ""]), (ValueType.BOOL_LIST, [True, False]),
    (ValueType.DOUBLE_LIST, []), (ValueType.UNIX_TIMESTAMP, datetime(2026, 1, 2, tzinfo=UTC)),
]


@pytest.mark.parametrize(("kind", "value"), CASES, ids=[str(c[0]) for c in CASES])
def test_matches_feast(kind: ValueType, value: object) -> None:
    (proto,) = python_values_to_proto_values([value], kind)
    proto = Value.FromString(proto.SerializeToString())  # as read back from Redis
    assert to_python(proto) == feast_value_type_to_python_type(proto)
    assert type(to_python(proto)) is type(feast_value_type_to_python_type(proto))


def test_unset_is_none() -> None:
    assert to_python(Value()) is None


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("value", ["u_000123", "", "ü-ß-✓", "x" * 70_000])
def test_string_key_encoder_matches_feast(version: int, value: str) -> None:
    project = b"fraud"
    encode = string_key_encoder("user_id", version, project)
    proto = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=value)])
    expected = serialize_entity_key(proto, entity_key_serialization_version=version) + project
    if encode is None:  # a layout it does not reproduce: the caller uses Feast's function
        assert version <= 2
        return
    assert encode(value) == expected


def test_key_encoder_always_reproduces_feast() -> None:
    for version in (2, 3):
        proto = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val="u_1")])
        expected = serialize_entity_key(proto, entity_key_serialization_version=version) + b"p"
        assert key_encoder("user_id", version, b"p")("u_1") == expected


def _stamp(seconds: int, nanos: int = 0) -> bytes:
    return Timestamp(seconds=seconds, nanos=nanos).SerializeToString()


def test_never_written_is_an_absent_or_zero_row_time() -> None:
    """One rule for both readers: absent, empty or zero `_ts` (Feast's `online_read` answers
    the epoch for such a key) means no row; any other time, however old, is a row."""
    assert never_written(None) and never_written(Timestamp()) and never_written(EPOCH)
    assert not never_written(Timestamp(nanos=1)) and not never_written(Timestamp(seconds=-1))
    assert not never_written(datetime(1990, 1, 1, tzinfo=UTC))

    config = SimpleNamespace(entity_key_serialization_version=3, project="p")
    reader = HashReader(config, "user_id", [("v1", ["a", "b"]), ("v2", ["c"])])
    assert len(reader.fields) == 5
    a = Value(int64_val=7).SerializeToString()
    c = Value(string_val="x").SerializeToString()
    old = 631_152_000  # 1990: a row, not the "unknown key" answer
    for ts1 in (None, b"", _stamp(0)):
        first, second = reader.decode([a, None, ts1, c, _stamp(old, 5000)])
        assert first is None
        assert second is not None and second.micros == old * 1_000_000 + 5
        assert second.python() == {"c": "x"}
        assert second.event_time() == datetime.fromtimestamp(old + 5e-6, tz=UTC)
    first, second = reader.decode([a, None, _stamp(1, 1000), None, None])
    assert first is not None and first.python() == {"a": 7, "b": None} and first.micros == 1_000_001
    assert second is None


def _raw(value: Value) -> bytes:
    return value.SerializeToString()


RAW_CASES = [
    b"", _raw(Value()), _raw(Value(double_val=0.0)), _raw(Value(double_val=-0.0)),
    _raw(Value(double_val=math.nan)), _raw(Value(double_val=-math.inf)),
    _raw(Value(double_val=5.716950582978359e-05)), _raw(Value(double_val=1e308)),
    *(_raw(Value(int64_val=v)) for v in (0, 1, 127, 128, 300, -1, -(2**63), 2**63 - 1,
                                        1_764_936_000_000_000)),
    _raw(Value(int32_val=-3)), _raw(Value(float_val=2.5)), _raw(Value(string_val="m_1")),
    _raw(Value(bool_val=True)), _raw(Value(double_list_val={"val": [1.5, -2.0]})),
    _raw(Value(int64_list_val={"val": [1, 2**40]})), _raw(Value(string_list_val={"val": ["a"]})),
    # the fast layouts followed by more fields: the last value of the oneof wins
    _raw(Value(int64_val=5)) + _raw(Value(double_val=1.5)),
    _raw(Value(double_val=1.5)) + _raw(Value(int64_val=5)),
    _raw(Value(int64_val=5)) + _raw(Value(int64_val=9)),
    # a non-canonical 10-byte varint (no writer makes one): bits past 64 are dropped
    bytes([0x20, *[0xFF] * 9, 0x7F]),
]


@pytest.mark.parametrize("raw", RAW_CASES, ids=[r.hex() or "empty" for r in RAW_CASES])
def test_python_value_is_the_protos(raw: bytes) -> None:
    expected = to_python(Value.FromString(raw))
    got = python_value(raw)
    assert type(got) is type(expected)
    if isinstance(expected, float):
        assert struct.pack("<d", got) == struct.pack("<d", expected)  # NaN and -0.0 too
    else:
        assert got == expected
    assert python_value(None) is None


def _exact(v: object) -> object:
    """A value compared bit for bit: floats by their bytes (NaN, -0.0), lists element-wise."""
    if isinstance(v, float):
        return struct.pack("<d", v)
    if isinstance(v, list):
        return [type(x).__name__ for x in v], [_exact(x) for x in v]
    return v


def _same(got: list[object], expected: list[object]) -> None:
    assert [type(v) for v in got] == [type(v) for v in expected]
    assert [_exact(v) for v in got] == [_exact(v) for v in expected]


INT64S = [0, 1, 127, 128, 300, 16_383, 16_384, 2**31, -1, -(2**63), 2**63 - 1, -300,
          1_764_936_000_123_456]

COLUMNS = {
    "doubles": [_raw(Value(double_val=v)) for v in (0.5, -0.0, math.nan, 1e308, -math.inf)] * 4,
    "doubles and nulls": [_raw(Value(double_val=0.5)), None, b"", _raw(Value(double_val=2.0))] * 5,
    "small ints": [_raw(Value(int64_val=v)) for v in (0, 1, 127, 5)] * 5,
    "small ints and one large": [_raw(Value(int64_val=v)) for v in (0, 1, 127, 5)] * 5
    + [_raw(Value(int64_val=128))],
    "small ints and a negative": [_raw(Value(int64_val=v)) for v in (3, -1)] * 6,
    "int32 of the same length": [_raw(Value(int32_val=v)) for v in (3, 4)] * 6,
    "bools": [_raw(Value(bool_val=v)) for v in (True, False)] * 6,
    "a double and a trailing int": [_raw(Value(double_val=1.5))] * 9
    + [_raw(Value(double_val=1.5)) + _raw(Value(int64_val=5))],
    "int64 lists": [_raw(Value(int64_list_val={"val": v})) for v in (
        [1_764_936_000_123_456, 0, 127, 128, 2**63 - 1], [], [5], [2**35] * 15)] * 3,
    "int64 lists and nulls": [_raw(Value(int64_list_val={"val": [3, 300]})), None] * 5
    + [_raw(Value(int64_list_val={"val": []}))],
    "int64 lists, one negative": [_raw(Value(int64_list_val={"val": [1, 2]}))] * 9
    + [_raw(Value(int64_list_val={"val": [-1]}))],
    "int64 lists, one of 128 bytes": [_raw(Value(int64_list_val={"val": [1, 2]}))] * 9
    + [_raw(Value(int64_list_val={"val": [2**50] * 16}))],
    "int64 lists, an explicit empty field": [bytes([0x72, 2, 0x0A, 0])] * 4
    + [_raw(Value(int64_list_val={"val": [7]}))] * 5,
    "int64 lists and a double list": [_raw(Value(int64_list_val={"val": [1]}))] * 9
    + [_raw(Value(double_list_val={"val": [1.0]}))],
    "double lists": [_raw(Value(double_list_val={"val": v})) for v in (
        [0.5, -0.0, math.nan], [], [1e308, -math.inf], [0.1] * 15)] * 3,
    "double lists, one long": [_raw(Value(double_list_val={"val": [0.5]}))] * 9
    + [_raw(Value(double_list_val={"val": [0.5] * 20}))],
    "long lists (two-byte lengths)": [_raw(Value(double_list_val={"val": [i / 3] * (n % 40)}))
                                      for i, n in enumerate(range(0, 400, 7))],
    "double lists of 15 and 16 doubles (lengths 120..131)": [
        _raw(Value(double_list_val={"val": [1.5] * n})) for n in (15, 16, 15, 16)] * 3,
    "a 16,000-byte list and a 16,800-byte one": [
        _raw(Value(double_list_val={"val": [0.25] * 2000})),
        _raw(Value(double_list_val={"val": [0.25] * 2100}))] * 5,
    "the largest two-byte lengths": [
        _raw(Value(double_list_val={"val": [0.25] * n})) for n in (2046, 2047)] * 5,
    "double lists and a trailing field": [_raw(Value(double_list_val={"val": [0.5]}))] * 9
    + [_raw(Value(double_list_val={"val": [0.5]})) + _raw(Value(int64_val=1))],
    "string lists": [_raw(Value(string_list_val={"val": ["m_1", "m_2"]}))] * 9,
    # past `_VARINTS_MIN`: int64s of every varint length, by column (`_varints`)
    "int64s of every length": [_raw(Value(int64_val=v)) for v in INT64S] * 10,
    "int64s and nulls": [_raw(Value(int64_val=v)) if i % 3 else (None, b"")[i % 2]
                         for i, v in enumerate(INT64S * 15)],
    "int64s, non-canonical varints": [_raw(Value(int64_val=300))] * 130
    + [bytes([0x20, 0x80, 0x00]), bytes([0x20, *[0xFF] * 9, 0x7F])],
    "int64s and a trailing field": [_raw(Value(int64_val=300))] * 130
    + [_raw(Value(int64_val=300)) + _raw(Value(int64_val=5))],
    "int64s and an int32 of the same length": [_raw(Value(int64_val=300))] * 130
    + [_raw(Value(int32_val=300))],
    "mixed kinds": RAW_CASES * 2,
    "all null": [None, b""] * 6,
    "short": [_raw(Value(double_val=0.5)), None],
    "empty": [],
}


@pytest.mark.parametrize("name", list(COLUMNS))
def test_decode_column_is_python_value(name: str) -> None:
    raws = COLUMNS[name]
    _same(decode_column(raws), [python_value(r) for r in raws])
    _same(decode_column(tuple(raws)), [python_value(r) for r in raws])


@pytest.mark.parametrize(("name", "at_once"), [
    ("double lists", True), ("long lists (two-byte lengths)", True),
    ("double lists of 15 and 16 doubles (lengths 120..131)", True),
    ("the largest two-byte lengths", True), ("a 16,000-byte list and a 16,800-byte one", False),
    ("double lists and a trailing field", False), ("int64 lists", False)])
def test_which_list_columns_decode_at_once(name: str, at_once: bool) -> None:
    """The cases above exercise the whole-column decoding, not only its fallback."""
    raws = [r for r in COLUMNS[name] if r]
    lists = _double_lists(raws)
    assert (lists is not None) is at_once
    if lists is not None:
        _same(lists, [python_value(r) for r in raws])  # type: ignore[arg-type]
    long = COLUMNS[name] * 40  # past `_LISTS_MIN`: `decode_column` takes the same way
    _same(decode_column(long), [python_value(r) for r in long])


@pytest.mark.parametrize("broken", [
    bytes([0x7A, 0x0A, 0x0A, 0x08, *b"\x00" * 7]),  # the doubles cut one byte short
    bytes([0x7A, 0x0B, 0x0A, 0x09, *b"\x00" * 9]),  # a packed field of 9 bytes
])
def test_decode_column_refuses_what_protobuf_refuses(broken: bytes) -> None:
    """A list of doubles that is no ValueProto fails a column decoded at once as it fails
    `python_value`, rather than reading into the next list."""
    with pytest.raises(DecodeError):
        python_value(broken)
    good = _raw(Value(double_list_val={"val": [0.5, 1.5]}))
    with pytest.raises(DecodeError):
        decode_column([good] * 70 + [broken] + [good] * 5)


def test_double_lists_with_nulls_at_once() -> None:
    raws = [_raw(Value(double_list_val={"val": [0.5] * (i % 5)})) if i % 4 else (None, b"")[i % 8 // 4]
            for i in range(200)]
    _same(decode_column(raws), [python_value(r) for r in raws])
    assert _double_lists([r for r in raws if r]) is not None


def test_decode_columns_is_decode_as_python() -> None:
    """By column, the row times and Python values `decode` answers row by row (None for the
    values of a view an entity has no row of), for more rows than `decode_column` decodes
    one by one."""
    config = SimpleNamespace(entity_key_serialization_version=3, project="p")
    reader = HashReader(config, "user_id", [("v1", ["a", "b"]), ("v2", ["c"]), ("v3", ["d"])])
    replies = [
        [_raw(Value(int64_val=-7)), None, _stamp(1_764_936_000, 123_456_789),
         _raw(Value(double_list_val={"val": [0.5]})), _stamp(5),
         _raw(Value(double_val=2.5)), b""],
        [_raw(Value(int64_val=3)), _raw(Value(double_val=1.0)), _stamp(0),
         _raw(Value(double_val=4.0)), _stamp(7, 1000), None, None],
    ] * 6 + [[None] * 7]
    columns = reader.decode_columns(replies)
    assert len(columns) == 3
    for j, (times, values) in enumerate(columns):
        rows = [reader.decode(reply)[j] for reply in replies]
        assert times == [None if row is None else row.micros for row in rows]
        assert len(values) == len(reader.views[j][1])
        for k, feature in enumerate(reader.views[j][1]):
            _same(values[k], [None if row is None else row.python()[feature] for row in rows])
    assert columns[0][0][:2] == [1_764_936_000_123_456, None]
    assert columns[0][1][0][:3] == [-7, None, -7]
    assert reader.decode_columns([]) == [([], [[], []]), ([], [[]]), ([], [[]])]


STAMPS = [_stamp(1_764_936_000, 123_456_789), _stamp(1_764_936_000), _stamp(0, 5_000),
          _stamp(0), _stamp(-86_400, 999_999_999), _stamp(7, 1000), b"", None,
          _stamp(2**40, 1)]


@pytest.mark.parametrize(("raws", "at_once"), [
    (STAMPS * 15, True),
    ([_stamp(1_764_936_000 + i, i * 997) for i in range(150)], True),
    (STAMPS * 15 + [_stamp(5) + _stamp(6)], False),  # a field twice: the last one wins
    (STAMPS * 15 + [bytes([0x10, 0x01, 0x08, 0x02])], False),  # nanos before seconds
    (STAMPS[:3], True),  # below `_VARINTS_MIN`: value by value
], ids=["kinds", "one layout", "a field twice", "fields reversed", "short"])
def test_row_times_are_row_micros(raws: list[bytes | None], at_once: bool) -> None:
    assert row_times(raws) == [_row_micros(r) for r in raws]
    assert row_times(tuple(raws)) == [_row_micros(r) for r in raws]
    fields = _varints([r for r in raws if r], (0x08, 0x10))
    assert (fields is not None) is at_once  # the cases exercise the column decoding too
    assert (len(raws) >= _VARINTS_MIN) is (len(raws) > 3)  # ... and `row_times` takes it


def test_int64_columns_decode_at_once() -> None:
    raws = [r for r in COLUMNS["int64s of every length"] if r]
    assert len(raws) >= _VARINTS_MIN
    ints = _varints(raws, (0x20,))
    assert ints is not None and ints[0].view("int64").tolist() == INT64S * 10
    assert _varints(COLUMNS["int64s and a trailing field"], (0x20,)) is None


def test_row_times_refuse_what_protobuf_refuses() -> None:
    broken = bytes([0x08, *[0xFF] * 10, 0x01])  # a varint past 10 bytes
    with pytest.raises(DecodeError):
        _row_micros(broken)
    with pytest.raises(DecodeError):
        row_times([_stamp(5)] * 130 + [broken])
