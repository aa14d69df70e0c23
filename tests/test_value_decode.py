"""The scorer's inlined codecs equal Feast's own: ValueProto decoding and entity-key encoding."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values
from feast.value_type import ValueType

from feature_repo.redis_store.wire import string_key_encoder, to_python

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
