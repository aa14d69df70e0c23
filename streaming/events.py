"""Parsing raw events into `TransactionEvent`s, and dead letters for those that fail.

Nothing is dropped silently: every input becomes either an event or a `DeadLetter` carrying
the reason, where it came from and the original bytes (bounded, see `DeadLetter.to_json`),
which the flow writes to `transactions.dlq`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from feature_repo.contract import TransactionEvent, future_excess_s, to_micros

MAX_ORIGINAL_BYTES = 64 * 1024  # of the original kept in a dead letter; the rest is cut
MAX_REASON_CHARS = 1000  # an exception's text can quote its input: bounded as well
# Where a record came from: (topic, partition, offset); None for records of a log or a list.
Origin = tuple[str | None, int | None, int | None]


@dataclass(frozen=True)
class DeadLetter:
    """An input that could not be used, why, its original bytes (UTF-8 JSON if rebuilt) and,
    for a Kafka record, its coordinates."""

    reason: str
    original: bytes
    key: bytes | None = None
    origin: Origin | None = None

    def to_json(self, max_original: int = MAX_ORIGINAL_BYTES) -> bytes:
        """The dead letter as JSON of bounded size, whatever the original was.

        Keys: `reason`; `original`, the first `max_original` bytes as text when they are
        UTF-8, else base64 (`encoding` says which: "utf-8" or "base64"); `size`, the length
        of the whole original in bytes; `truncated`; `topic`, `partition`, `offset` (null
        outside Kafka).  At most about 6 x `max_original` + 2 KB (JSON escapes of control
        characters), so 64 KiB of any bytes stay far below a broker's 1 MB record limit.
        """
        cut = self.original[:max_original]
        truncated = len(cut) < len(self.original)
        text, encoding = _as_text(cut, truncated)
        topic, partition, offset = self.origin or (None, None, None)
        return json.dumps(
            {"reason": self.reason[:MAX_REASON_CHARS], "original": text, "encoding": encoding,
             "size": len(self.original), "truncated": truncated, "topic": topic,
             "partition": partition, "offset": offset},
            ensure_ascii=False,
        ).encode()


def _as_text(cut: bytes, truncated: bool) -> tuple[str, str]:
    """`cut` as UTF-8 text (a character split by the cut is dropped), else as base64."""
    try:
        return cut.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as exc:
        if truncated and exc.start >= len(cut) - 3 and exc.reason == "unexpected end of data":
            return cut[:exc.start].decode("utf-8"), "utf-8"
        return base64.b64encode(cut).decode("ascii"), "base64"


def decode_original(letter: dict[str, Any]) -> bytes:
    """The (possibly truncated) original bytes of a dead letter read back from its JSON."""
    if letter.get("encoding") == "base64":
        return base64.b64decode(letter["original"])
    return str(letter["original"]).encode()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ALL_FIELDS = frozenset(TransactionEvent.model_fields)


@dataclass(frozen=True)
class Envelope:
    """A valid event plus when it entered the system (producer time, epoch seconds) and, for
    a Kafka record, where it came from.

    Pickled compactly (Bytewax pickles every event it routes to another process): the event's
    field values, its time as epoch microseconds, and the event rebuilt without validating it
    again.  The copy equals the original, fields set included (tested).
    """

    event: TransactionEvent
    produced_at: float | None = None
    origin: Origin | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        e = self.event
        fields_set = e.model_fields_set
        return (_envelope, (
            e.schema_version, e.transaction_id, e.user_id, e.merchant_id, e.amount, e.currency,
            e.channel, to_micros(e.event_timestamp), self.produced_at, self.origin,
            None if fields_set == _ALL_FIELDS else frozenset(fields_set)))


def _envelope(schema_version: int, transaction_id: str, user_id: str, merchant_id: str,
              amount: float, currency: str, channel: str, ts_us: int, produced_at: float | None,
              origin: Origin | None, fields_set: frozenset[str] | None) -> Envelope:
    """`Envelope.__reduce__`'s inverse: the values were validated before they were pickled."""
    event = TransactionEvent.model_construct(
        None if fields_set is None else set(fields_set), schema_version=schema_version,
        transaction_id=transaction_id, user_id=user_id, merchant_id=merchant_id, amount=amount,
        currency=currency, channel=channel,
        event_timestamp=_EPOCH + timedelta(microseconds=ts_us))
    return Envelope(event, produced_at, origin)


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "event"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid event: " + "; ".join(parts)


def parse(
    raw: bytes | dict[str, Any], produced_at: float | None = None, origin: Origin | None = None
) -> Envelope | DeadLetter:
    """Validate one raw event (Kafka bytes or a log record) against the contract."""
    try:
        if isinstance(raw, bytes | bytearray):
            event = TransactionEvent.model_validate_json(raw)
        else:
            event = TransactionEvent.model_validate(raw)
        return Envelope(event, produced_at, origin)
    except ValidationError as exc:
        original = raw if isinstance(raw, bytes) else json.dumps(raw, default=str).encode()
        return DeadLetter(_reason(exc), bytes(original), origin=origin)
    except Exception as exc:  # noqa: BLE001 - anything unparseable is a dead letter, never a crash
        original = raw if isinstance(raw, bytes) else repr(raw).encode()
        return DeadLetter(f"unparseable event: {type(exc).__name__}: {exc}", bytes(original),
                          origin=origin)


def future_reason(event: TransactionEvent, reference_s: float, bound_s: float) -> str | None:
    """The dead-letter reason ("future: ...") of an event more than `bound_s` ahead of the
    reference clock `reference_s` (epoch seconds), None for an event within the bound.

    The bound is the API's (`feature_repo.contract.future_excess_s`); the stream's reference
    clock is min(wall clock, the Kafka record's timestamp), so a replay after a crash decides
    as the first reading did (see `streaming.flow.parse_item`).
    """
    reference = datetime.fromtimestamp(reference_s, UTC)
    excess = future_excess_s(event.event_timestamp, reference, bound_s)
    if excess is None:
        return None
    return (f"future: event_timestamp {event.event_timestamp.isoformat()} lies "
            f"{excess + bound_s:.0f} s ahead of {reference.isoformat()} "
            f"(at most {bound_s:g} s allowed)")
