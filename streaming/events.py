"""Parsing raw events into `TransactionEvent`s, and dead letters for those that fail.

Nothing is dropped silently: every input becomes either an event or a `DeadLetter` carrying
the reason, where it came from and the original bytes (bounded, see `DeadLetter.to_json`),
which the flow writes to `transactions.dlq`.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from pydantic import ValidationError

from feature_repo.contract import (
    CHANNELS,
    CURRENCIES,
    MAX_AMOUNT,
    TransactionEvent,
    construct,
    future_excess_s,
    to_micros,
)

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


# The canonical form of a schema-version-1 event, as `TransactionEvent.model_dump_json()`
# writes it (the project's producers): fields in the contract's order, no whitespace, ASCII
# identifiers, a plain decimal amount, the time in UTC with "Z".  A subset of what the contract
# accepts (see `_canonical_event`); the field list and constraints it relies on are checked
# against the contract when this module loads (`_CANONICAL_CONTRACT`).
_ID = r'"([A-Za-z0-9_.:-]{1,64})"'  # ASCII \w and ".:-": a subset of the contract's Identifier
_CANONICAL = re.compile(
    r'\{"schema_version":1,"transaction_id":' + _ID + ',"user_id":' + _ID
    + ',"merchant_id":' + _ID
    # at most 15 significant digits: float() and the contract's JSON parser agree exactly
    + r',"amount":((?:0|[1-9][0-9]{0,6})(?:\.[0-9]{1,8})?)'
    + ',"currency":"(' + "|".join(map(re.escape, CURRENCIES)) + ')"'
    + ',"channel":"(' + "|".join(map(re.escape, CHANNELS)) + ')"'
    + r',"event_timestamp":"([0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]'
    + r'(?:\.[0-9]{6})?Z)"\}'
).fullmatch
_FIELDS = tuple(TransactionEvent.model_fields)
_from_iso = datetime.fromisoformat
_intern = sys.intern


def _canonical_contract() -> bool:
    """Whether the contract is still the one `_CANONICAL` was written for: its fields in this
    order, schema version 1, identifiers of 1-64 characters of `^[\\w.:-]+$`, amounts in
    (0, MAX_AMOUNT], currencies and channels those the regex is built from, the time checked
    by `_iso_text` and `_utc`, no other model setting.  If not, every event takes the
    contract's validation (and a test fails, so the fast path is brought up to date)."""
    fields = TransactionEvent.model_fields
    ids = [fields[f].metadata for f in ("transaction_id", "user_id", "merchant_id")]
    amount = fields["amount"].metadata
    ts = fields["event_timestamp"]
    return (
        _FIELDS == ("schema_version", "transaction_id", "user_id", "merchant_id", "amount",
                    "currency", "channel", "event_timestamp")
        and dict(TransactionEvent.model_config) == {"extra": "forbid", "frozen": True}
        and get_args(fields["schema_version"].annotation) == (1,)
        and all(len(m) == 1 and (m[0].min_length, m[0].max_length, m[0].pattern)
                == (1, 64, r"^[\w.:-]+$") for m in ids)
        and fields["amount"].annotation is float
        and [repr(m) for m in amount[:4]] == [
            "Strict(strict=True)", "Gt(gt=0)", f"Le(le={MAX_AMOUNT!r})",
            "AllowInfNan(allow_inf_nan=False)"]
        and [_validator(m) for m in amount[4:]] == ["AfterValidator:_finite_amount"]
        and get_args(fields["currency"].annotation) == CURRENCIES
        and get_args(fields["channel"].annotation) == CHANNELS
        and ts.annotation is datetime
        and [_validator(m) for m in ts.metadata] == ["BeforeValidator:_iso_text",
                                                     "AfterValidator:_utc"]
    )


def _validator(m: Any) -> str:
    return f"{type(m).__name__}:{getattr(getattr(m, 'func', None), '__name__', None)}"


_CANONICAL_CONTRACT = _canonical_contract()


def _canonical_event(raw: bytes) -> TransactionEvent | None:
    """The event of `raw` if it is in the canonical form (`_CANONICAL`), else None (the caller
    validates it against the contract, which gives the event or the error).

    The same event the contract's validation builds (tested on random and edge-case
    documents), at about half its CPU (docs/benchmarks.md, issue 20): the form admits only
    values the contract accepts unchanged (ASCII identifiers, an amount whose decimal text
    `float` reads exactly as JSON does, a UTC time that `_iso_text` passes and `_utc`
    keeps), so the event is built from them as `model_validate_json` builds it: every field
    set, no extra or private attributes.  A date that does not exist (`fromisoformat` raises)
    and an amount out of range are left to the contract.  The ids that repeat across events
    (user, merchant) and the currency and channel are interned, as the contract's JSON parser
    shares repeated strings: one object per user id and merchant id across the states, their
    hashes computed once."""
    try:
        m = _CANONICAL(raw.decode())
    except UnicodeDecodeError:
        return None
    if m is None:
        return None
    transaction_id, user_id, merchant_id, amount_text, currency, channel, ts = m.groups()
    amount = float(amount_text)
    if not 0.0 < amount <= MAX_AMOUNT:
        return None
    try:
        event_timestamp = _from_iso(ts)
    except ValueError:
        return None
    return construct(TransactionEvent, {  # every field set, as validation sets them
        "schema_version": 1, "transaction_id": transaction_id, "user_id": _intern(user_id),
        "merchant_id": _intern(merchant_id), "amount": amount, "currency": _intern(currency),
        "channel": _intern(channel), "event_timestamp": event_timestamp})


def parse(
    raw: bytes | dict[str, Any], produced_at: float | None = None, origin: Origin | None = None
) -> Envelope | DeadLetter:
    """Validate one raw event (Kafka bytes or a log record) against the contract (bytes in
    the canonical form by `_canonical_event`, which builds the same event)."""
    try:
        if isinstance(raw, bytes | bytearray):
            event = (_canonical_event(raw) if _CANONICAL_CONTRACT and type(raw) is bytes
                     else None) or TransactionEvent.model_validate_json(raw)
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
