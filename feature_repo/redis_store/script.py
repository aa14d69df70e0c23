"""The newer-row-wins script and its calls packed as Redis protocol.

The rule (Feast's `online_write_batch`): a row is written only if the key's stored
`_ts:<view>` is absent, zero or strictly older (compared as (seconds, nanos)), so a writer
never rolls a key back and a repeated write is a no-op.  The script checks and applies it
atomically per key inside Redis, for a batch of keys per call; a key is written with one HSET
(several for views wider than 80 features, still one atomic step), so it is either untouched
or fully written.  On a Redis Cluster every call's keys share one hash slot (`cluster`).
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from redis.connection import Connection

from feature_repo.redis_store.encode import EncodedRows, RowEncoder
from feature_repo.redis_store.tokens import buffer_of, offsets_of
from feature_repo.redis_store.wire import field_name, ts_field

_FIELDS_PER_HSET = 80  # a Lua call takes at most ~250 arguments

# Check-and-set of a batch of keys in one script call.  KEYS: the Redis keys.  ARGV: the
# `_ts:<view>` field, the number of features n, the key TTL in seconds (0: none), "1" to skip
# the timestamp check (Feast's `skip_dedup`), the n feature field names, then per key its
# serialized Timestamp followed by its n serialized values.  Returns how many keys it wrote.
_SCRIPT = string.Template("""
local function varint(s, i)
  local v, mul, k, b = 0, 1, 0, 0
  repeat
    b = string.byte(s, i + k); k = k + 1
    v = v + (b % 128) * mul; mul = mul * 128
  until b < 128
  if k == 10 then
    local c = 0; mul = 1
    for j = 0, 8 do c = c + (127 - string.byte(s, i + j) % 128) * mul; mul = mul * 128 end
    v = -(c + 1)
  end
  return v, i + k
end
local function stamp(s)
  local sec, nanos, i = 0, 0, 1
  while i <= #s do
    local tag = string.byte(s, i)
    local v
    v, i = varint(s, i + 1)
    if tag == 8 then sec = v elseif tag == 16 then nanos = v end
  end
  return sec, nanos
end
local call, tsf, ttl, force = redis.call, ARGV[1], tonumber(ARGV[3]), ARGV[4] == '1'
local width, first, written = $n + 1, 5 + $n, 0
for i = 1, #KEYS do
  local key, b = KEYS[i], first + (i - 1) * width
  local new = ARGV[b]
  local ok = force
  if not ok then
    local old = call('HGET', key, tsf)
    if not old then
      ok = true
    else
      local os, on = stamp(old)
      if os == 0 and on == 0 then
        ok = true
      else
        local ns, nn = stamp(new)
        ok = ns > os or (ns == os and nn > on)
      end
    end
  end
  if ok then
$writes
    if ttl > 0 then call('EXPIRE', key, ttl) end
    written = written + 1
  end
end
return written
""")


def write_script(n_features: int) -> bytes:
    """The check-and-set script for views of `n_features` features.

    The HSET argument lists are spelled out (field name `ARGV[4 + j]`, value `ARGV[b + j]`),
    which saves building a table per key; views wider than 80 features take several HSETs
    (still one atomic step per key).
    """
    pairs = [f"ARGV[{4 + j}], ARGV[b + {j}]" for j in range(1, n_features + 1)]
    chunks = [pairs[i:i + _FIELDS_PER_HSET] for i in range(0, n_features, _FIELDS_PER_HSET)]
    writes = "\n".join(
        f"    call('HSET', key, {'tsf, new, ' if i == 0 else ''}{', '.join(chunk)})"
        for i, chunk in enumerate(chunks)
    )
    return _SCRIPT.substitute(n=n_features, writes=writes).encode()


def script_header(encoder: RowEncoder, *, ttl: int, force: bool) -> list[bytes]:
    """The script's leading ARGV: ts field, feature count, TTL, force flag, field names."""
    return [ts_field(encoder.view_name), b"%d" % len(encoder.features), b"%d" % ttl,
            b"1" if force else b"0",
            *(field_name(encoder.view_name, name) for name, _ in encoder.features)]


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def script_sha(script: bytes) -> bytes:
    """The SHA1 digest Redis names a loaded script by (`SCRIPT LOAD`, `EVALSHA`)."""
    return hashlib.sha1(script).hexdigest().encode()  # noqa: S324 - Redis's script name


def script_calls(encoded: EncodedRows, script: bytes, header: Sequence[bytes],
                 keys_per_call: int, *, runs: Sequence[tuple[int, int]] | None = None,
                 by_sha: bool = False) -> Iterator[bytes]:
    """`EVAL script n key... header... values...` commands of at most `keys_per_call` keys,
    packed as Redis protocol.

    `runs`: (start, end) row ranges, each split into calls of its own, so no call spans two
    runs (a cluster's slots); default the whole batch.  `by_sha`: `EVALSHA <script_sha>`
    instead of sending the script's text with every call (the script must be loaded on the
    node first).
    """
    key_offsets, value_offsets = offsets_of(encoded.keys), offsets_of(encoded.values)
    key_data = memoryview(buffer_of(encoded.keys))
    value_data = memoryview(buffer_of(encoded.values))
    head = b"".join(_bulk(h) for h in header)
    command = (b"$7\r\nEVALSHA\r\n" + _bulk(script_sha(script)) if by_sha
               else b"$4\r\nEVAL\r\n" + _bulk(script))
    for run_start, run_end in runs if runs is not None else [(0, len(encoded.keys))]:
        for start in range(run_start, run_end, keys_per_call):
            end = min(start + keys_per_call, run_end)
            n = end - start
            count = 3 + n + len(header) + n * encoded.values_per_row
            yield b"".join([
                b"*%d\r\n" % count, command, _bulk(b"%d" % n),
                key_data[key_offsets[start]:key_offsets[end]], head,
                value_data[value_offsets[start]:value_offsets[end]],
            ])


@dataclass(frozen=True)
class CallPlan:
    """How a writer's batches become script calls, whichever sender (one node, or a
    cluster's primaries) sends them."""

    script: bytes
    header: Sequence[bytes]
    keys_per_call: int
    max_in_flight: int

    def calls(self, encoded: EncodedRows, *, runs: Sequence[tuple[int, int]] | None = None,
              by_sha: bool = False) -> Iterator[bytes]:
        """`script_calls` for this plan."""
        return script_calls(encoded, self.script, self.header, self.keys_per_call,
                            runs=runs, by_sha=by_sha)

    def send(self, streams: Sequence[tuple[Connection, Iterable[bytes]]]) -> int:
        """`send_pipelined` with this plan's bound on calls in flight."""
        return send_pipelined(streams, self.max_in_flight)


def send_pipelined(streams: Sequence[tuple[Connection, Iterable[bytes]]],
                   max_in_flight: int) -> int:
    """Sends each connection's packed calls, keeping up to `max_in_flight` awaiting their reply
    per connection and taking the connections in turn (so every node works at once); returns
    the sum of the integer replies.  An error reply is raised as redis-py raises it, with other
    replies left unread: the caller must disconnect every connection then."""
    calls = [(conn, iter(it)) for conn, it in streams]
    pending = [0] * len(calls)
    written = 0
    active = list(range(len(calls)))
    while active:
        still = []
        for i in active:
            conn, it = calls[i]
            call = next(it, None)
            if call is None:
                continue
            # a health check (PING) only while no reply is pending
            conn.send_packed_command([call], check_health=pending[i] == 0)
            pending[i] += 1
            if pending[i] >= max_in_flight:
                written += int(conn.read_response())
                pending[i] -= 1
            still.append(i)
        active = still
    for (conn, _), n in zip(calls, pending, strict=True):
        for _ in range(n):
            written += int(conn.read_response())
    return written
