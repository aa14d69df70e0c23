"""Reading entity hashes back: one pipelined HMGET per entity, decoded as Feast decodes them.

Feast keeps every feature view of an entity in one hash (`wire`), so one HMGET reads all the
views of one join key an entity has, where Feast's `online_read` sends one pipeline per view.
On one node the asyncio reader (the HTTP scorer's) sends all of a read's HMGETs in one call
of a read-only script (`_READ_SCRIPT`: one command and one reply for the client to pack and
parse instead of one per entity; the replies are the HMGETs' own), or, past `_SCRIPT_MAX_KEYS`
keys, in a few such calls in one pipeline.  On a Redis Cluster the
pipeline is redis-py's cluster pipeline: it groups the HMGETs by the node owning each key's
slot and sends each node its share at once (sync: all nodes written, then all read; asyncio:
the nodes concurrently), so a read costs one round trip per node that owns one of its keys,
and redis-py follows MOVED/ASK redirections while slots move.
The values are byte-identical ValueProtos; `tests/integration/serving/test_api.py`, the skew test and
`tests/integration/streaming/test_seeding.py` check the result against Feast's own reads.

The one rule for a key that holds no row of a view (`never_written`): its `_ts:<view>` field is
absent, empty or zero.  Feast writes that field with every row, answers the Unix epoch from
`online_read` for a key it never saw, and its writer, like `writer`'s script, treats a stored
zero as absent.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import numpy as np
import redis.asyncio
from feast.protos.feast.types.Value_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

from feature_repo.redis_store.client import AsyncClient, SyncClient
from feature_repo.redis_store.wire import field_name, key_encoder, to_python, ts_field

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def never_written(ts: Timestamp | datetime | None) -> bool:
    """Whether a row time read back means "no row" (see the module docstring); takes the
    stored Timestamp or the datetime Feast's `online_read` returns."""
    if ts is None:
        return True
    if isinstance(ts, datetime):
        return ts == EPOCH
    return _unwritten(ts.seconds, ts.nanos)


def _unwritten(seconds: int, nanos: int) -> bool:
    """`never_written` on a stored Timestamp's fields: both zero (or absent)."""
    return seconds == 0 and nanos == 0


@dataclass(frozen=True, slots=True)
class StoredRow:
    """One view's stored row of one entity."""

    ts: Timestamp
    values: dict[str, Value]  # feature -> ValueProto; an empty Value when null or absent

    @property
    def micros(self) -> int:
        """The row's event time, microseconds since the epoch (exact)."""
        return self.ts.seconds * 1_000_000 + self.ts.nanos // 1000

    def event_time(self) -> datetime:
        """The row's event time as Feast's `online_read` returns it."""
        return datetime.fromtimestamp(self.ts.seconds + self.ts.nanos / 1e9, tz=UTC)

    def python(self) -> dict[str, Any]:
        """The values as Python (`wire.to_python`; None when null)."""
        return {f: to_python(v) for f, v in self.values.items()}


class HashReader:
    """Rows of one or more feature views for entities with one string join key.

    `views`: (stored view name, features to read) pairs; `decode` and `decode_columns` answer
    in that order.
    """

    def __init__(self, config: Any, join_key: str,
                 views: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.join_key = join_key
        self.views = [(name, list(features)) for name, features in views]
        self.key = key_encoder(join_key, config.entity_key_serialization_version,
                               config.project.encode())
        self.fields: list[bytes] = []
        for name, features in self.views:
            self.fields += [field_name(name, f) for f in features]
            self.fields.append(ts_field(name))

    def decode(self, reply: Sequence[bytes | None]) -> list[StoredRow | None]:
        """One entity's HMGET reply -> its row of each view, None where `never_written`."""
        return [None if ts is None else StoredRow(ts, {
                    f: Value.FromString(b) if b else Value()
                    for f, b in zip(features, raw, strict=True)})
                for features, raw, ts in self._per_view(reply)]

    def decode_columns(self, replies: Sequence[Sequence[bytes | None]]) -> list[ViewColumns]:
        """Many entities' HMGET replies -> per view, each entity's row time
        (`StoredRow.micros`, None where `never_written`) and, per feature, each entity's value
        as Python (`StoredRow.python()`'s values; None where the entity has no row of the
        view): `decode` without a ValueProto per value, and by column, for a fraction of the
        per-value work on a large read (`decode_column`).
        tests/unit/feature_repo/test_value_decode.py checks it against `decode`."""
        columns = list(zip(*replies, strict=True)) if replies else [()] * len(self.fields)
        out: list[ViewColumns] = []
        pos = 0
        for _, features in self.views:
            end = pos + len(features)
            times = row_times(columns[end])
            values = [decode_column(c) for c in columns[pos:end]]
            if None in times:
                absent = [i for i, t in enumerate(times) if t is None]
                for col in values:
                    for i in absent:
                        col[i] = None
            out.append((times, values))
            pos = end + 1
        return out

    def _per_view(self, reply: Sequence[bytes | None]
                  ) -> Iterator[tuple[list[str], Sequence[bytes | None], Timestamp | None]]:
        """Per view of the reply: its features, their raw values, and its row's timestamp
        (None where `never_written`)."""
        pos = 0
        for _, features in self.views:
            end = pos + len(features)
            raw_ts = reply[end]
            ts = Timestamp.FromString(raw_ts) if raw_ts else None
            yield features, reply[pos:end], None if ts is None or never_written(ts) else ts
            pos = end + 1


_DOUBLE = struct.Struct("<d").unpack_from
_DOUBLE_TAG, _INT64_TAG = 0x29, 0x20  # ValueProto's double_val (5, fixed64), int64_val (4, varint)
_U64 = (1 << 64) - 1
_DOUBLE_TAGS, _INT64_TAGS = bytes([_DOUBLE_TAG]), bytes([_INT64_TAG])


def python_value(raw: bytes | None) -> Any:
    """`wire.to_python(Value.FromString(raw))` (None for a null or absent value, stored as
    b""), with the two scalar kinds most features have read straight from their bytes: a
    double_val is its tag and 8 little-endian bytes, an int64_val its tag and a varint.  Any
    other layout goes through the ValueProto.  `tests/unit/feature_repo/test_value_decode.py`
    checks both ways agree."""
    if not raw:
        return None
    head = raw[0]
    if head == _DOUBLE_TAG and len(raw) == 9:
        return _DOUBLE(raw, 1)[0]
    if head == _INT64_TAG and len(raw) <= 11:
        value, shift = 0, 0
        for i in range(1, len(raw)):
            b = raw[i]
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if i == len(raw) - 1:  # the varint ends the message: nothing else follows
                    value &= _U64  # as protobuf: a 10-byte varint's bits past 64 are dropped
                    return value - (1 << 64) if value >= 1 << 63 else value
                break
    return to_python(Value.FromString(raw))


def _row_micros(raw: bytes | None) -> int | None:
    """A view's stored `_ts` field -> `StoredRow.micros`, or None where `never_written`."""
    if not raw:
        return None
    ts = Timestamp.FromString(raw)
    return None if never_written(ts) else ts.seconds * 1_000_000 + ts.nanos // 1000


_SECONDS_TAG, _NANOS_TAG = 0x08, 0x10  # Timestamp's seconds (1, varint), nanos (2, varint)
# Below this many values a column of varint messages is decoded value by value (the
# whole-column work costs more than it saves: about even at 100-150 Timestamps).
_VARINTS_MIN = 128


def row_times(raws: Sequence[bytes | None]) -> list[int | None]:
    """`[_row_micros(raw) for raw in raws]`, the Timestamps decoded by column (`_varints`)
    when there are `_VARINTS_MIN` or more and every one has the layout protobuf writes."""
    present = cast(Sequence[bytes], raws if raws.count(None) + raws.count(b"") == 0
                   else [r for r in raws if r])
    fields = _varints(present, (_SECONDS_TAG, _NANOS_TAG)) if len(raws) >= _VARINTS_MIN else None
    if fields is None:
        return [_row_micros(raw) for raw in raws]
    seconds = fields[0].view(np.int64).tolist()
    nanos = fields[1].astype(np.uint32).view(np.int32).tolist()  # int32: the low 32 bits
    times = [None if _unwritten(s, ns) else s * 1_000_000 + ns // 1000
             for s, ns in zip(seconds, nanos, strict=True)]
    if len(present) == len(raws):
        return times
    it = iter(times)
    return [next(it) if raw else None for raw in raws]


def _varints(raws: Sequence[bytes], tags: tuple[int, ...]) -> list[np.ndarray] | None:
    """Messages made only of varint fields with the one-byte keys `tags`, decoded by column:
    per tag, each message's value as uint64 (0 where a message lacks the field, protobuf's
    default; bits past 64 dropped, as protobuf drops them), or None unless every message
    has its fields at most once each, in `tags` order, each a varint of at most 10 bytes,
    and nothing else.  Messages of one length are decoded together, and must all have the
    first one's layout (where its keys are and where its varints end)."""
    n = len(raws)
    out = [np.zeros(n, np.uint64) for _ in tags]
    lengths = np.fromiter(map(len, raws), np.int64, n)
    for length in np.unique(lengths).tolist():
        rows = np.flatnonzero(lengths == length)
        block = np.frombuffer(b"".join([raws[i] for i in rows.tolist()]), np.uint8)
        block = block.reshape(len(rows), length)
        layout = _varint_layout(raws[int(rows[0])], tags)
        if layout is None:
            return None
        for k, key_at, end in layout:
            start = key_at + 1
            if not ((block[:, key_at] == tags[k]).all()
                    and (block[:, start:end] >= 0x80).all() and (block[:, end] < 0x80).all()):
                return None
            groups = (block[:, start:end + 1] & 0x7F).astype(np.uint64)
            shifts = np.arange(0, 7 * (end + 1 - start), 7, dtype=np.uint64)
            # the groups' bits never overlap: their sum is their OR
            out[k][rows] = np.bitwise_or.reduce(groups << shifts, axis=1)
    return out


def _varint_layout(raw: bytes, tags: tuple[int, ...]) -> list[tuple[int, int, int]] | None:
    """(which tag, where its key is, where its varint's last byte is) of each field of one
    message, or None unless `_varints` takes its layout."""
    layout: list[tuple[int, int, int]] = []
    pos, last = 0, -1
    while pos < len(raw):
        if raw[pos] not in tags or tags.index(raw[pos]) <= last:
            return None
        last = tags.index(raw[pos])
        end = pos + 1
        while end < len(raw) and raw[end] & 0x80:
            end += 1
        if end >= len(raw) or end - pos > 10:  # unterminated, or past 10 bytes
            return None
        layout.append((last, pos, end))
        pos = end + 1
    return layout


# Below this many values a column is decoded value by value (the whole-column checks cost
# more than they save).
_COLUMN_MIN = 8


@functools.lru_cache(maxsize=64)
def _doubles(n: int) -> Callable[[bytes], tuple[float, ...]]:
    """Unpacks `n` double_val ValueProtos joined (tag byte, 8 little-endian bytes each)."""
    return struct.Struct("<" + "xd" * n).unpack


def decode_column(raws: Sequence[bytes | None]) -> list[Any]:
    """`[python_value(raw) for raw in raws]`, with the layouts of whole columns that most
    features have decoded at once: every value a double_val (its tag and 8 bytes), every
    value an int64_val below 128 (its tag and one byte), or, in a column of `_LISTS_MIN` or
    more, every value a list of doubles (`_double_lists`).  Null and absent values (None,
    b"") are set aside first; any other column goes value by value."""
    n = len(raws)
    if n < _COLUMN_MIN:
        return [python_value(raw) for raw in raws]
    present = cast(Sequence[bytes], raws if raws.count(None) + raws.count(b"") == 0
                   else [r for r in raws if r])
    decoded = _decode_present(present)
    if len(present) == n:
        return decoded
    it = iter(decoded)
    return [next(it) if raw else None for raw in raws]


def _decode_present(raws: Sequence[bytes]) -> list[Any]:
    n = len(raws)
    if not n:
        return []
    lengths = set(map(len, raws))
    if len(lengths) == 1:
        (length,) = lengths
        joined = b"".join(raws)
        if length == 9 and joined[::9] == _DOUBLE_TAGS * n:
            return list(_doubles(n)(joined))
        if length == 2 and joined[::2] == _INT64_TAGS * n:
            small = joined[1::2]
            if max(small) < 0x80:  # one-byte varints: the byte is the value
                return list(small)
    head = raws[0][0]
    if head == _DOUBLE_LIST_TAG and n >= _LISTS_MIN:
        lists = _double_lists(raws)
        if lists is not None:
            return lists
    if head == _INT64_TAG and n >= _VARINTS_MIN:  # int64s, some past one byte
        ints = _varints(raws, (_INT64_TAG,))
        if ints is not None:
            return ints[0].view(np.int64).tolist()
    if head in _LIST_TAGS:  # lists (the first value's kind): none has `python_value`'s layouts
        return list(map(to_python, map(Value.FromString, raws)))
    return [python_value(raw) for raw in raws]


_DOUBLE_LIST_TAG = 0x7A  # ValueProto's double_list_val (15, a message)
# The first byte of the list kinds' ValueProtos (fields 11-15, length-delimited; 16-18 take
# two bytes and go value by value)
_LIST_TAGS = frozenset((field << 3) | 2 for field in range(11, 16))
# Below this many lists a column of them is decoded value by value (where the whole-column
# work costs more; columns of int64 lists, whose varints numpy decodes no faster than
# protobuf, always are: docs/benchmarks.md, fifth session).
_LISTS_MIN = 64


def _double_lists(raws: Sequence[bytes]) -> list[list[float]] | None:
    """A column of double_list_val ValueProtos decoded at once, or None unless every value
    has the layout Feast's writer gives a list: the tag and the list message's length, then
    either nothing (an empty list) or the packed field (0x0A) and its length, each length a
    canonical varint of one or two bytes (a list under 16 KiB), then the little-endian
    doubles."""
    lengths = np.fromiter(map(len, raws), np.int64, len(raws))
    buf = np.frombuffer(b"".join(raws), np.uint8)
    at = np.cumsum(lengths) - lengths  # where each value starts
    if not (lengths >= 2).all() or not (buf[at] == _DOUBLE_LIST_TAG).all():
        return None
    list_len, list_ok, list_size = _varint_header(buf, at + 1, lengths - 1)
    empty = list_len == 0
    full = ~empty
    field = at + 1 + list_size  # the packed field's tag, in a non-empty list
    payload, field_ok, field_size = _varint_header(buf, np.where(full, field + 1, at),
                                                   np.where(full, list_len - 1, 0))
    if not (list_ok.all() and (empty | (field_ok & (list_len >= 2))).all()
            and (buf[field[full]] == 0x0A).all()):
        return None
    sizes = np.where(empty, 0, payload)  # payload bytes of each value
    if (sizes % 8).any():
        return None
    heads = lengths - sizes
    header = np.zeros(len(buf), bool)
    for k in range(int(heads.max())):
        header[at[heads > k] + k] = True
    doubles = np.frombuffer(buf[~header].tobytes(), "<f8").tolist()
    out, pos = [], 0
    for count in (sizes // 8).tolist():
        out.append(doubles[pos:pos + count])
        pos += count
    return out


def _varint_header(buf: np.ndarray, at: np.ndarray, room: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position in `at`, the length that a canonical varint of one or two bytes there
    must hold for the rest of its message (`room` bytes from `at`, the varint included) to
    be exactly that length; whether the bytes there are that varint; and its size."""
    size = np.where(room - 1 <= 0x7F, 1, 2)
    value = room - size
    ok = (value >= 0) & np.where(size == 1, value <= 0x7F, (value > 0x7F) & (value <= 0x3FFF))
    first = np.where(size == 1, value, (value & 0x7F) | 0x80)
    last = len(buf) - 1
    ok &= buf[np.minimum(at, last)] == first
    ok &= (size == 1) | (buf[np.minimum(at + 1, last)] == value >> 7)
    return value, ok, size


ViewColumns = tuple[list[int | None], list[list[Any]]]  # per view: row times, value columns
Reads = Sequence[tuple[HashReader, Sequence[str]]]  # (reader, join key values)
Rows = list[list[list[StoredRow | None]]]  # per read, per entity, per view
Replies = list[list[list[bytes | None]]]  # per read, per entity: its HMGET reply, undecoded
_Row = TypeVar("_Row")


def read_rows(client: SyncClient, reads: Reads) -> Rows:
    """All `reads` in one pipeline (one round trip per node; one node unless a cluster)."""
    with client.pipeline(transaction=False) as pipe:
        for reader, values in reads:
            for value in values:
                pipe.hmget(reader.key(value), reader.fields)  # type: ignore[arg-type]
        return _decode(reads, pipe.execute())


async def read_rows_async(client: AsyncClient, reads: Reads) -> Rows:
    """`read_rows` on an asyncio client; on one node, the HMGETs in calls of `_READ_SCRIPT`
    of up to `_SCRIPT_MAX_KEYS` keys each, sent in one round trip (unless the server refused
    the script: then pipelines)."""
    return _decode(reads, await _replies_async(client, reads))


async def read_replies_async(client: AsyncClient, reads: Reads) -> Replies:
    """`read_rows_async`'s replies undecoded, per read (for `HashReader.decode_columns`)."""
    replies = await _replies_async(client, reads)
    out: Replies = []
    pos = 0
    for _, values in reads:
        out.append(replies[pos:pos + len(values)])
        pos += len(values)
    return out


async def _replies_async(client: AsyncClient, reads: Reads) -> list[list[bytes | None]]:
    if (_script_allowed and not isinstance(client, redis.asyncio.RedisCluster)
            and all(len(reader.fields) <= _SCRIPT_MAX_FIELDS for reader, _ in reads)):
        replies = await _scripted_hmgets(client, reads)
        if replies is not None:
            return replies
    async with client.pipeline(transaction=False) as pipe:
        for reader, values in reads:
            for value in values:
                pipe.hmget(reader.key(value), reader.fields)  # type: ignore[arg-type]
        return cast(list[list[bytes | None]], await pipe.execute())


# Every HMGET of a read in one script call: one command and one reply to pack and parse
# instead of one per entity (a client's per-command work is most of a large read's CPU).
# KEYS: every entity's key, read by read.  ARGV: the number of reads, then per read the
# number of its keys, the number of its fields and the fields.  Returns the HMGET replies in
# KEYS order.  It only reads; on one node its keys need not share a hash slot (a cluster
# reads through the pipeline instead).
_READ_SCRIPT = """
local out, k, a = {}, 1, 2
for _ = 1, tonumber(ARGV[1]) do
  local nkeys, nfields = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local fields = {unpack(ARGV, a + 2, a + 1 + nfields)}
  a = a + 2 + nfields
  for _ = 1, nkeys do
    out[k] = redis.call('HMGET', KEYS[k], unpack(fields))
    k = k + 1
  end
end
return out
"""
_READ_SHA = hashlib.sha1(_READ_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis's script id
_SCRIPT_MAX_FIELDS = 200  # fields passed to one Lua call through unpack (wider: the pipeline)
# A script runs alone on the server: a large read in one call would hold every other client
# (stream writers, other scorers' single reads) for its whole length (2,000 keys x 30 fields:
# 15 ms of Redis, where the same HMGETs pipelined took 8 ms in all and let others in between).
# A larger read (a batch of 1,000 transactions: 2,000 keys) is split into calls of at most
# this many keys, sent in one pipeline: Redis serves other clients between the calls, and the
# client packs and parses a few commands instead of one per key.
_SCRIPT_MAX_KEYS = 512
# Refusals that mean "no scripts for this client here" (NOPERM: an ACL without EVALSHA; a proxy that
# wants one slot per call, scripting disabled): the reader falls back to pipelines for good.
# (redis-py raises NOPERM as NoPermissionError and strips the "ERR " of the others)
_SCRIPT_REFUSED = ("CROSSSLOT", "unknown command", "ERR unknown command", "unknown or disabled")
_script_allowed = True
log = logging.getLogger(__name__)


async def _scripted_hmgets(client: redis.asyncio.Redis, reads: Reads
                           ) -> list[list[bytes | None]] | None:
    """The HMGET replies of every entity of `reads`, in order, from script calls of at most
    `_SCRIPT_MAX_KEYS` keys each (one call, or several in one pipeline; the script is loaded
    into Redis first if it does not know it: a restarted or flushed script cache); None if
    the server refuses scripts (`_SCRIPT_REFUSED`): the caller pipelines instead."""
    global _script_allowed
    calls = _script_calls(reads)
    if not calls:
        return []

    async def call() -> list[list[list[bytes | None]]]:
        if len(calls) == 1:
            keys, args = calls[0]
            return [await client.evalsha(_READ_SHA, len(keys), *keys, *args)]  # type: ignore[misc]
        async with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(_READ_SHA, len(keys), *keys, *args)
            return cast(list[list[list[bytes | None]]], await pipe.execute())

    try:
        try:
            parts = await call()
        except NoScriptError:
            await client.script_load(_READ_SCRIPT)
            parts = await call()
    except ResponseError as exc:
        if not _refused(exc):
            raise  # a real error of the read (a key of the wrong type ...): the pipeline's too
        _script_allowed = False
        log.warning("Redis refused the read script (%s); reading with pipelines from now on",
                    exc)
        return None
    return [reply for part in parts for reply in part]


def _refused(exc: ResponseError) -> bool:
    """Whether Redis refused the script itself (`_SCRIPT_REFUSED`, NOPERM), also as one command
    of a pipeline, whose error redis-py rewrites as "Command # n (...) of pipeline caused
    error: " and the repr of the server's error's arguments, `("unknown command ...",)`."""
    if isinstance(exc, NoPermissionError):
        return True
    message = str(exc)
    _, annotated, own = message.partition(" of pipeline caused error: ")
    return (own.lstrip("(\"'") if annotated else message).startswith(_SCRIPT_REFUSED)


def _script_calls(reads: Reads) -> list[tuple[list[bytes], list[bytes | int]]]:
    """(KEYS, ARGV) of each `_READ_SCRIPT` call of a read: its keys in order, in as few calls
    of at most `_SCRIPT_MAX_KEYS` keys as it takes, of about equal size."""
    total = sum(len(values) for _, values in reads)
    if not total:
        return []
    n = -(-total // _SCRIPT_MAX_KEYS)
    size = -(-total // n)
    calls: list[tuple[list[bytes], list[bytes | int]]] = []
    keys: list[bytes] = []
    groups: list[tuple[HashReader, int]] = []  # (reader, keys of it) in the current call
    for reader, values in reads:
        start = 0
        while start < len(values):
            take = min(len(values) - start, size - len(keys))
            keys += [reader.key(v) for v in values[start:start + take]]
            groups.append((reader, take))
            start += take
            if len(keys) == size:
                calls.append((keys, _script_args(groups)))
                keys, groups = [], []
    if keys:
        calls.append((keys, _script_args(groups)))
    return calls


def _script_args(groups: list[tuple[HashReader, int]]) -> list[bytes | int]:
    args: list[bytes | int] = [len(groups)]
    for reader, nkeys in groups:
        args += [nkeys, len(reader.fields), *reader.fields]
    return args


def _decode(reads: Reads, replies: list[list[bytes | None]]) -> Rows:
    return _per_entity(reads, replies, HashReader.decode)


def _per_entity(reads: Reads, replies: list[list[bytes | None]],
                decode: Callable[[HashReader, Sequence[bytes | None]], list[_Row]]
                ) -> list[list[list[_Row]]]:
    """The replies (one per entity, in read order) decoded by `decode(reader, reply)`."""
    out: list[list[list[_Row]]] = []
    pos = 0
    for reader, values in reads:
        out.append([decode(reader, r) for r in replies[pos:pos + len(values)]])
        pos += len(values)
    return out
