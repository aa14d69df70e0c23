"""The cluster writer's routing without a cluster: batches sorted by hash slot, calls per slot.

Redis Cluster runs a script only when all its keys share one slot; `cluster.by_slot` and
`script.script_calls(runs=...)` must give calls whose keys all hash to one slot, covering every
row of the batch exactly once, each key with its own row's values, rows of a slot in batch
order.  Slots are computed with redis-py's `key_slot` (which honours `{hash tags}`, possible in
Feast's binary keys).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from feast.protos.feast.types.Value_pb2 import Value
from feast.value_type import ValueType
from redis.crc import key_slot

from feature_repo.redis_store.cluster import by_slot, raw_keys
from feature_repo.redis_store.encode import EncodedRows, RowEncoder
from feature_repo.redis_store.script import script_calls, script_sha, write_script


def _encoded(names: list[str]) -> EncodedRows:
    encoder = RowEncoder(project="p", view_name="v", join_keys=[("k", ValueType.STRING.value)],
                         features=[("f", ValueType.INT64.value)], key_serialization_version=3)
    table = pa.table({"k": names, "f": pa.array(range(len(names)), pa.int64())})
    return encoder.encode(table, np.arange(len(names)) + 1_000_000)


def _parse(call: bytes) -> list[bytes]:
    """A packed command back into its arguments."""
    assert call.startswith(b"*")
    head, rest = call.split(b"\r\n", 1)
    args = []
    for _ in range(int(head[1:])):
        size, rest = rest.split(b"\r\n", 1)
        n = int(size[1:])
        args.append(rest[:n])
        rest = rest[n + 2:]
    assert rest == b""
    return args


def test_calls_hold_one_slot_each_and_cover_the_batch_once() -> None:
    names = [f"user-{i}" for i in range(400)] + ["{tag}a", "{tag}b", "x{tag}", "{}c", "}{d"]
    encoded = _encoded(names)
    keys = raw_keys(encoded)
    value_of = {k: i for i, k in enumerate(keys)}
    assert key_slot(keys[-5]) == key_slot(keys[-4])  # a hash tag inside Feast's key bytes
    ordered, slots, runs = by_slot(encoded)
    assert slots == sorted(slots) and len(set(slots)) == len(slots)
    script = write_script(1)
    header = [b"_ts:v", b"1", b"0", b"0", b"field"]
    seen: list[bytes] = []
    for call in script_calls(ordered, script, header, 3, runs=runs, by_sha=True):
        args = _parse(call)
        assert args[:2] == [b"EVALSHA", script_sha(script)]
        n = int(args[2])
        call_keys = args[3:3 + n]
        assert 1 <= n <= 3
        assert len({key_slot(k) for k in call_keys}) == 1
        values = args[3 + n + len(header):]
        assert len(values) == 2 * n  # timestamp + one feature per key
        for j, k in enumerate(call_keys):  # each key carries its own row's value
            assert values[2 * j + 1] == Value(int64_val=value_of[k]).SerializeToString()
        seen += call_keys
    assert sorted(seen) == sorted(keys) and len(seen) == len(keys)
    for slot in set(slots):  # batch order kept within a slot
        in_slot = [k for k in seen if key_slot(k) == slot]
        assert in_slot == [k for k in keys if key_slot(k) == slot]


def test_eval_calls_without_runs_are_unchanged() -> None:
    encoded = _encoded(["a", "b", "c", "d", "e"])
    calls = list(script_calls(encoded, b"return 1", [b"h"], 2))
    assert [_parse(c)[:3] for c in calls] == [[b"EVAL", b"return 1", b"2"]] * 2 + [
        [b"EVAL", b"return 1", b"1"]]
