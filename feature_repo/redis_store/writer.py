"""Writing encoded rows: Feast's newer-row-wins rule as one Lua script, sent from one thread.

Used by the materialization engine (`feast materialize`) and by the stream's velocity sink.

The rule (Feast's `online_write_batch`): a row is written only if the key's stored
`_ts:<view>` is absent, zero or strictly older (compared as (seconds, nanos)), so a writer
never rolls a key back and a repeated write is a no-op.  Here it is checked and applied
atomically per key inside Redis, for a batch of keys per script call.  A key is written with
one HSET (several for views wider than 80 features, still one atomic step), so it is either
untouched or fully written.

Delivery: at-least-once, idempotent by key.  `ScriptWriter.flush` returns once everything
sent before it is acknowledged; connection errors and timeouts are retried (resending a
batch is safe by the rule above); any other error, or retries exhausted, is raised by the
next `send` or `flush`, and nothing sent after it is written.
"""

from __future__ import annotations

import logging
import queue
import string
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
from redis.connection import Connection

from feature_repo.redis_store.client import redis_client
from feature_repo.redis_store.encode import EncodedRows, RowEncoder
from feature_repo.redis_store.tokens import buffer_of, offsets_of
from feature_repo.redis_store.wire import field_name, ts_field

log = logging.getLogger(__name__)

KEYS_PER_CALL = 100  # a call holds Redis for its duration: this bounds other clients' wait
MAX_IN_FLIGHT = 16  # script calls sent ahead of their reply (pipelining keeps Redis busy)
ATTEMPTS = 3  # per batch, on connection errors and timeouts
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


def script_calls(encoded: EncodedRows, script: bytes, header: Sequence[bytes],
                 keys_per_call: int) -> Iterator[bytes]:
    """`EVAL script n key... header... values...` commands of at most `keys_per_call` keys,
    packed as Redis protocol."""
    key_offsets, value_offsets = offsets_of(encoded.keys), offsets_of(encoded.values)
    key_data = memoryview(buffer_of(encoded.keys))
    value_data = memoryview(buffer_of(encoded.values))
    head = b"".join(_bulk(h) for h in header)
    for start in range(0, len(encoded.keys), keys_per_call):
        end = min(start + keys_per_call, len(encoded.keys))
        n = end - start
        count = 3 + n + len(header) + n * encoded.values_per_row
        yield b"".join([
            b"*%d\r\n$4\r\nEVAL\r\n" % count, _bulk(script), _bulk(b"%d" % n),
            key_data[key_offsets[start]:key_offsets[end]], head,
            value_data[value_offsets[start]:value_offsets[end]],
        ])


class WriteError(RuntimeError):
    """A batch could not be written (the cause is chained)."""


_Job = tuple[EncodedRows, Callable[[], None] | None]


class ScriptWriter:
    """Sends encoded batches as pipelined script calls, from one background thread.

    Batches arrive already packed as Redis protocol (`encode`), so the thread only moves bytes:
    it keeps up to `max_in_flight` calls awaiting their reply on one connection while the
    caller encodes the next batch (at most `queued` batches wait in between; `send` blocks
    beyond).  A batch is acknowledged when all its replies are read; then its `on_written`
    callback runs, in the writer's thread.  Delivery: see the module docstring.
    """

    def __init__(self, client: redis.Redis, script: bytes, header: Sequence[bytes], *,
                 keys_per_call: int = KEYS_PER_CALL, max_in_flight: int = MAX_IN_FLIGHT,
                 queued: int = 2, attempts: int = ATTEMPTS) -> None:
        self._client = client
        self._script = script
        self._header = list(header)
        self._keys_per_call = keys_per_call
        self._max_in_flight = max_in_flight
        self._attempts = attempts
        self._conn: Connection | None = None
        self._error: BaseException | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queued)
        self._thread = threading.Thread(target=self._loop, name="redis-writer", daemon=True)
        self._thread.start()
        self.written = 0  # keys the script wrote (a retried batch: its last attempt's)

    def __enter__(self) -> ScriptWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, encoded: EncodedRows, on_written: Callable[[], None] | None = None) -> None:
        """Queue a batch; raises WriteError if an earlier one failed."""
        self._raise()
        self._jobs.put((encoded, on_written))

    def flush(self) -> int:
        """Returns once every batch sent so far is acknowledged, with `written`; raises
        WriteError if one failed."""
        self._jobs.join()
        self._raise()
        return self.written

    def close(self) -> None:
        """Stops the thread once the batches already sent are done (or skipped after a
        failure) and closes the client.  Raises nothing: `flush` first to know the outcome."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if self._conn is not None:
            self._client.connection_pool.release(self._conn)
            self._conn = None
        self._client.close()

    def _raise(self) -> None:
        if self._error is not None:
            raise WriteError(f"Redis write failed: {self._error!r}") from self._error

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:  # after a failure nothing more is written
                    encoded, on_written = job
                    self.written += self._write(encoded)
                    if on_written is not None:
                        on_written()
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                self._error = e
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _write(self, encoded: EncodedRows) -> int:
        failures = 0
        while True:
            if self._conn is None:
                self._conn = self._client.connection_pool.get_connection()
            try:
                return self._send(self._conn, encoded)
            except (redis.ConnectionError, redis.TimeoutError):
                self._conn.disconnect()  # replies may be unread: reconnect for the next attempt
                failures += 1
                if failures >= self._attempts:
                    raise
                log.warning("Redis write failed, retrying", exc_info=True)
                time.sleep(0.2 * 2 ** (failures - 1))
            except BaseException:
                self._conn.disconnect()
                raise

    def _send(self, conn: Connection, encoded: EncodedRows) -> int:
        written = pending = 0
        for call in script_calls(encoded, self._script, self._header, self._keys_per_call):
            # a health check (PING) only while no reply is pending
            conn.send_packed_command([call], check_health=pending == 0)
            pending += 1
            if pending >= self._max_in_flight:
                written += int(conn.read_response())
                pending -= 1
        for _ in range(pending):
            written += int(conn.read_response())
        return written


def view_writer(online_store: Any, encoder: RowEncoder, *, socket_timeout_s: float,
                **options: Any) -> ScriptWriter:
    """A ScriptWriter of `encoder`'s view into the online store of Feast's config (a plain
    Redis, `client.is_plain_redis`), with its key TTL and `skip_dedup`; `options` as
    ScriptWriter's.  `socket_timeout_s`: the least read timeout (a call may outlast the
    store's serving timeout)."""
    header = script_header(encoder, ttl=online_store.key_ttl_seconds or 0,
                           force=bool(getattr(online_store, "skip_dedup", False)))
    client = redis_client(online_store, socket_timeout_s=socket_timeout_s)
    return ScriptWriter(client, write_script(len(encoder.features)), header, **options)
