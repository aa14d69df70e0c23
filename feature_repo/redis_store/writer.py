"""Writing encoded rows with the newer-row-wins script (`script`), from one background thread.

Used by the materialization engine (`feast materialize`), the stream's velocity sink and
seeding's writes, on a single Redis node or a Redis Cluster (`cluster`: each call's keys in one
slot, sent to the primary owning it).  The rule and its atomicity per key: see `script`.

Delivery: at-least-once, idempotent by key.  `ScriptWriter.flush` returns once everything
sent before it is acknowledged; connection errors, timeouts and a cluster's redirections
(MOVED, ASK, TRYAGAIN, CLUSTERDOWN: the slot map is refreshed first) are retried, resending
the batch (safe by the rule); any other error, or retries exhausted, is raised by the next
`send` or `flush`, and nothing sent after it is written.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis
from redis.connection import Connection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)

from feature_repo.redis_store.client import redis_client
from feature_repo.redis_store.cluster import ClusterSender
from feature_repo.redis_store.encode import EncodedRows, RowEncoder
from feature_repo.redis_store.script import CallPlan, script_header, write_script

__all__ = ["ATTEMPTS", "KEYS_PER_CALL", "MAX_IN_FLIGHT", "ScriptWriter", "WriteError",
           "script_header", "view_writer", "write_script"]

log = logging.getLogger(__name__)

KEYS_PER_CALL = 100  # a call holds Redis for its duration: this bounds other clients' wait
MAX_IN_FLIGHT = 16  # script calls sent ahead of their reply, per node (pipelining)
ATTEMPTS = 3  # per batch, on connection errors, timeouts and cluster redirections
# resending the batch may succeed (MovedError is an AskError; NOSCRIPT: the script is loaded
# again on the new connection)
_RETRIED = (redis.ConnectionError, redis.TimeoutError, AskError, TryAgainError,
            ClusterDownError, SlotNotCoveredError, NoScriptError)


class WriteError(RuntimeError):
    """A batch could not be written (the cause is chained)."""


_Job = tuple[EncodedRows, Callable[[], None] | None]


class _Sender(Protocol):
    def send(self, encoded: EncodedRows) -> int: ...
    def reset(self, *, refresh: bool) -> None: ...
    def close(self) -> None: ...


class NodeSender:
    """Sends a writer's batches to a single Redis node, on one connection (`EVAL`)."""

    def __init__(self, client: redis.Redis, plan: CallPlan) -> None:
        self._client = client
        self._plan = plan
        self._conn: Connection | None = None

    def send(self, encoded: EncodedRows) -> int:
        if self._conn is None:
            self._conn = self._client.connection_pool.get_connection()
        return self._plan.send([(self._conn, self._plan.calls(encoded))])

    def reset(self, *, refresh: bool) -> None:
        """Disconnects (replies may be unread): the next `send` reconnects."""
        if self._conn is not None:
            self._conn.disconnect()

    def close(self) -> None:
        if self._conn is not None:
            self._client.connection_pool.release(self._conn)
            self._conn = None
        self._client.close()


class ScriptWriter:
    """Sends encoded batches as pipelined script calls, from one background thread.

    Batches arrive already packed as Redis protocol (`encode`), so the thread only moves bytes:
    it keeps up to `max_in_flight` calls awaiting their reply per connection (one per node)
    while the caller encodes the next batch (at most `queued` batches wait in between; `send`
    blocks beyond).  A batch is acknowledged when all its replies are read; then its `on_written`
    callback runs, in the writer's thread.  Delivery: see the module docstring.
    """

    def __init__(self, client: redis.Redis | redis.RedisCluster, script: bytes,
                 header: Sequence[bytes], *, keys_per_call: int = KEYS_PER_CALL,
                 max_in_flight: int = MAX_IN_FLIGHT, queued: int = 2,
                 attempts: int = ATTEMPTS) -> None:
        plan = CallPlan(script, list(header), keys_per_call, max_in_flight)
        self._sender: _Sender = (
            ClusterSender(client, plan) if isinstance(client, redis.RedisCluster)
            else NodeSender(client, plan))
        self._attempts = attempts
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
        self._sender.close()

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
            try:
                return self._sender.send(encoded)
            except _RETRIED:
                failures += 1
                if failures >= self._attempts:
                    self._sender.reset(refresh=False)
                    raise
                log.warning("Redis write failed, retrying", exc_info=True)
                time.sleep(0.2 * 2 ** (failures - 1))
                try:  # replies may be unread: reconnect (and re-read a cluster's slot map)
                    self._sender.reset(refresh=True)
                except redis.RedisError:
                    log.warning("Redis Cluster slot map not refreshed", exc_info=True)
            except BaseException:
                self._sender.reset(refresh=False)
                raise


def view_writer(online_store: Any, encoder: RowEncoder, *, socket_timeout_s: float,
                **options: Any) -> ScriptWriter:
    """A ScriptWriter of `encoder`'s view into the online store of Feast's config (a single
    node or a cluster, `client.is_supported`), with its key TTL and `skip_dedup`; `options` as
    ScriptWriter's.  `socket_timeout_s`: the least read timeout (a call may outlast the
    store's serving timeout)."""
    header = script_header(encoder, ttl=online_store.key_ttl_seconds or 0,
                           force=bool(getattr(online_store, "skip_dedup", False)))
    client = redis_client(online_store, socket_timeout_s=socket_timeout_s)
    return ScriptWriter(client, write_script(len(encoder.features)), header, **options)
