"""The stream's parse of canonical event bytes (`streaming.events._canonical_event`, issue 20)
gives exactly what the contract's validation gives: the same event (values, types, time
zone, fields set, JSON) for documents in the canonical form, and for everything else the
contract's own answer (the event or the same dead-letter reason)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import pytest
from pydantic import ConfigDict, StringConstraints, ValidationError

from feature_repo.contract import CHANNELS, CURRENCIES, TransactionEvent
from streaming import events
from streaming.events import DeadLetter, Envelope, _reason, parse

_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-"
_BASE = (b'{"schema_version":1,"transaction_id":"t-1","user_id":"u-1","merchant_id":"m-1",'
         b'"amount":92.37,"currency":"EUR","channel":"online",'
         b'"event_timestamp":"2026-12-05T16:54:16.304011Z"}')


def _reference(raw: bytes) -> TransactionEvent | str:
    """What the contract's validation alone makes of `raw`: the event, or the reason."""
    try:
        return TransactionEvent.model_validate_json(raw)
    except ValidationError as exc:
        return _reason(exc)


def _assert_same_event(got: TransactionEvent, want: TransactionEvent) -> None:
    assert got == want
    assert got.__dict__ == want.__dict__
    assert [type(v) for v in got.__dict__.values()] == [type(v) for v in want.__dict__.values()]
    assert got.event_timestamp.tzinfo is want.event_timestamp.tzinfo
    assert got.model_fields_set == want.model_fields_set
    assert got.model_extra == want.model_extra
    assert got.__pydantic_private__ == want.__pydantic_private__
    assert got.model_dump_json() == want.model_dump_json()
    assert hash(got.transaction_id) == hash(want.transaction_id)


def _assert_parse_agrees(raw: bytes) -> None:
    want = _reference(raw)
    got = parse(raw, 1.5, ("transactions", 0, 7))
    if isinstance(want, str):
        assert isinstance(got, DeadLetter) and got.reason == want, raw
    else:
        assert isinstance(got, Envelope), raw
        _assert_same_event(got.event, want)
        assert (got.produced_at, got.origin) == (1.5, ("transactions", 0, 7))


def test_the_contract_is_the_one_the_canonical_form_was_written_for() -> None:
    assert events._CANONICAL_CONTRACT  # else the fast path is off: update it to the contract


class _LongerIds(TransactionEvent):
    user_id: Annotated[str, StringConstraints(min_length=1, max_length=128,
                                              pattern=r"^[\w.:-]+$")]


class _MoreChannels(TransactionEvent):
    channel: Literal["card_present", "online", "contactless", "atm", "mail"]  # type: ignore[assignment]


class _LowerCase(TransactionEvent):
    model_config = ConfigDict(str_to_lower=True)


@pytest.mark.parametrize("variant", [_LongerIds, _MoreChannels, _LowerCase])
def test_a_changed_contract_turns_the_canonical_form_off(
        variant: type[TransactionEvent], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "TransactionEvent", variant)
    assert not events._canonical_contract()


def test_canonical_documents_give_the_validated_event() -> None:
    rng = random.Random(20)
    start = datetime(2000, 1, 1, tzinfo=UTC)
    for i in range(20_000):
        ident = ["".join(rng.choices(_ID_CHARS, k=rng.choice([1, 2, 12, 63, 64])))
                 for _ in range(3)]
        digits = rng.choice([0, 1, 2, 8])
        amount = round(rng.uniform(0.01, 1_000_000.0) if i % 3 else rng.uniform(0, 3), digits)
        if amount <= 0:
            continue
        ts = start + timedelta(microseconds=rng.randrange(40 * 365 * 86_400 * 10**6))
        if i % 5 == 0:
            ts = ts.replace(microsecond=0)
        event = TransactionEvent.model_validate({
            "transaction_id": ident[0], "user_id": ident[1], "merchant_id": ident[2],
            "amount": amount, "currency": rng.choice(CURRENCIES),
            "channel": rng.choice(CHANNELS), "event_timestamp": ts})
        raw = event.model_dump_json().encode()
        fast = events._canonical_event(raw)
        assert fast is not None, raw
        _assert_same_event(fast, TransactionEvent.model_validate_json(raw))
        again = events._canonical_event(bytes(raw))
        assert again is not None and again.user_id is fast.user_id  # one object per id
        assert again.merchant_id is fast.merchant_id


def test_amount_texts_read_as_json_reads_them() -> None:
    rng = random.Random(5)
    texts = ["0.01", "0.00000001", "1", "92", "1000000", "999999.99999999", "0.1", "0.3",
             "123456.78901234", "5e-324"]
    texts += [f"{rng.randrange(1, 10**7)}.{rng.randrange(10**8):0{rng.randrange(1, 9)}d}"
              for _ in range(20_000)]
    for text in texts:
        _assert_parse_agrees(_BASE.replace(b"92.37", text.encode()))


@pytest.mark.parametrize("old,new", [
    (b'"t-1"', b'"' + b"x" * 64 + b'"'),
    (b'"t-1"', b'"' + b"x" * 65 + b'"'),
    (b'"u-1"', b'""'),
    (b'"u-1"', '"u-é"'.encode()),
    (b'"u-1"', '"u-١"'.encode()),  # a non-ASCII digit: \w in the contract's pattern
    (b'"u-1"', b'"u 1"'),
    (b'"u-1"', b'"u-1\\n"'),
    (b'"u-1"', b'"u\\u002d1"'),  # an escape for "-": the same id, not the canonical form
    (b'"m-1"', b'"m/1"'),
    (b"92.37", b"0"),
    (b"92.37", b"0.0"),
    (b"92.37", b"1000000"),
    (b"92.37", b"1000000.01"),
    (b"92.37", b"1e3"),
    (b"92.37", b"01.5"),
    (b"92.37", b"-5"),
    (b"92.37", b"92.370000000000000001"),
    (b"92.37", b'"92.37"'),
    (b"92.37", b"true"),
    (b"92.37", b"null"),
    (b"92.37", b"1e400"),
    (b'"EUR"', b'"eur"'),
    (b'"online"', b'"mail"'),
    (b"2026-12-05T16:54:16.304011Z", b"2026-02-30T16:54:16.304011Z"),
    (b"2026-12-05T16:54:16.304011Z", b"2026-12-05T24:00:00Z"),
    (b"2026-12-05T16:54:16.304011Z", b"2026-12-05T23:59:60Z"),
    (b"2026-12-05T16:54:16.304011Z", b"2026-12-05T16:54:16Z"),
    (b"2026-12-05T16:54:16.304011Z", b"2026-12-05T16:54:16.304Z"),
    (b"2026-12-05T16:54:16.304011Z", b"2026-12-05T16:54:16.3040111Z"),
    (b"2026-12-05T16:54:16.304011Z", b"2026-12-05T16:54:16.304011+00:00"),
    (b"2026-12-05T16:54:16.304011Z", b"2026-12-05T17:54:16.304011+01:00"),
    (b"2026-12-05T16:54:16.304011Z", b"2026-12-05T16:54:16.304011"),
    (b"2026-12-05T16:54:16.304011Z", b"0000-12-05T16:54:16.304011Z"),
    (b"2026-12-05T16:54:16.304011Z", b"9999-12-31T23:59:59.999999Z"),
    (b"2026-12-05T16:54:16.304011Z", b"1700000000"),
    (b'"schema_version":1', b'"schema_version":2'),
    (b'"schema_version":1', b'"schema_version":1.0'),
    (b'"schema_version":1', b'"schema_version":true'),
    (b'"schema_version":1,', b""),
    (b'"channel":"online",', b'"channel":"online","extra":1,'),
    (b'"channel":"online",', b""),
    (b'"amount":92.37,', b'"amount":5,"amount":92.37,'),
    (b'"amount":92.37,', b'"amount":92.37,"amount":5,'),
    (b'{"schema_version":1,', b'{"schema_version": 1,'),
    (b'{"schema_version":1,"transaction_id":"t-1",', b'{"transaction_id":"t-1","schema_version":1,'),
    (b"}", b"}\n"),
    (b"}", b"} "),
    (b"}", b""),
    (b"{", b"[{"),
])
def test_other_documents_get_the_contracts_answer(old: bytes, new: bytes) -> None:
    assert old in _BASE
    _assert_parse_agrees(_BASE.replace(old, new, 1))


@pytest.mark.parametrize("raw", [_BASE, b"", b"{", b"\xff\xfe", b"null", b"[]", b"{}",
                                 _BASE.replace(b"u-1", b"u-\xff")])
def test_raw_inputs_and_bytearrays(raw: bytes) -> None:
    _assert_parse_agrees(raw)
    want, got = parse(raw), parse(bytearray(raw))  # type: ignore[arg-type]
    assert type(got) is type(want)
    if isinstance(got, Envelope):
        _assert_same_event(got.event, want.event)  # type: ignore[union-attr]
    else:
        assert got.reason == want.reason  # type: ignore[union-attr]
