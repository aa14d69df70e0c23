"""The layout of Feast's Redis online store, one key, field or value at a time.

Feast's RedisOnlineStore keeps every feature view of an entity in one hash:

* the key: `serialize_entity_key(entity key, version) + project`;
* the field `_ts:<view>`: a serialized `google.protobuf.Timestamp` of the row's event time;
* per feature, the field `mmh3("<view>:<feature>")` (4 bytes, little endian) holding the
  serialized `ValueProto`, or b"" when the value is null.

`encode` writes whole batches in this layout; `reader` reads it back.  Every function here is
checked against Feast's own (`tests/unit/feature_repo/test_value_decode.py`, `tests/integration/feature_repo/test_materialization_engine.py`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import mmh3
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import compute_versioned_name
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type

_SCALAR_KINDS = frozenset({"int32_val", "int64_val", "float_val", "double_val", "string_val",
                           "bool_val", "bytes_val"})
_LIST_KINDS = frozenset({"int32_list_val", "int64_list_val", "float_list_val",
                         "double_list_val", "string_list_val", "bool_list_val",
                         "bytes_list_val"})


def field_name(view_name: str, feature: str) -> bytes:
    """The hash field of a feature, as Feast's `_mmh3` computes it (murmur3_32, little endian)."""
    return struct.pack("<I", mmh3.hash(f"{view_name}:{feature}", signed=False))


def view_name(view: Any, config: Any) -> str:
    """A Feast feature view's name in the hash fields under a `RepoConfig` (versioned when
    Feast versions online views)."""
    return compute_versioned_name(view, config.registry.enable_online_feature_view_versioning)


def ts_field(view_name: str) -> bytes:
    """The hash field holding a view's row time."""
    return f"_ts:{view_name}".encode()


def to_python(value: Value) -> Any:
    """`feast_value_type_to_python_type`, with the plain scalar and list kinds inlined (the
    hot path's only kinds); every other kind goes through Feast's own function."""
    kind = value.WhichOneof("val")
    if kind is None:
        return None
    if kind in _SCALAR_KINDS:
        return getattr(value, kind)
    if kind in _LIST_KINDS:
        # a full slice of the repeated field: a new list, the values `list()` gives, built
        # in one call (about a third of `list()`'s per-element CPU on protobuf's upb backend)
        return getattr(value, kind).val[:]
    return feast_value_type_to_python_type(value)


def _feast_string_key(join_key: str, version: int, project: bytes) -> Callable[[str], bytes]:
    def encode(value: str) -> bytes:
        proto = EntityKeyProto(join_keys=[join_key], entity_values=[Value(string_val=value)])
        return serialize_entity_key(proto, entity_key_serialization_version=version) + project

    return encode


def string_key_encoder(join_key: str, version: int, project: bytes
                       ) -> Callable[[str], bytes] | None:
    """`value -> serialize_entity_key(one string key) + project` without building protos.

    Feast's serialization of a single string key ends with the value's length (uint32 LE) and
    its UTF-8 bytes; the part before is constant per join key, taken from Feast's own function.
    The encoder is returned only if it reproduces that function on probe values (else None:
    see `key_encoder`)."""
    feast_key = _feast_string_key(join_key, version, project)
    head = feast_key("")[: -len(project) - 4 if project else -4]
    pack = struct.Struct("<I").pack

    def encode(value: str) -> bytes:
        raw = value.encode()
        return head + pack(len(raw)) + raw + project

    probes = ("u_1", "", "ü-ß-✓", "x" * 300)
    return encode if all(encode(p) == feast_key(p) for p in probes) else None


def key_encoder(join_key: str, version: int, project: bytes) -> Callable[[str], bytes]:
    """The Redis key of an entity with one string join key: `string_key_encoder` when it
    reproduces Feast, else Feast's own serialization."""
    return (string_key_encoder(join_key, version, project)
            or _feast_string_key(join_key, version, project))
