"""Parsing raw events into `TransactionEvent`s, and dead letters for those that fail.

Nothing is dropped silently: every input becomes either an event or a `DeadLetter` carrying
the reason and the original bytes, which the flow writes to `transactions.dlq`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from feature_repo.contract import TransactionEvent


@dataclass(frozen=True)
class DeadLetter:
    """An input that could not be used, why, and the original bytes (UTF-8 JSON if rebuilt)."""

    reason: str
    original: bytes
    key: bytes | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {"reason": self.reason, "original": self.original.decode("utf-8", "replace")}
        ).encode()


@dataclass(frozen=True)
class Envelope:
    """A valid event plus when it entered the system (producer time, epoch seconds)."""

    event: TransactionEvent
    produced_at: float | None = None


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "event"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid event: " + "; ".join(parts)


def parse(raw: bytes | dict[str, Any], produced_at: float | None = None) -> Envelope | DeadLetter:
    """Validate one raw event (Kafka bytes or a log record) against the contract."""
    try:
        if isinstance(raw, bytes | bytearray):
            event = TransactionEvent.model_validate_json(raw)
        else:
            event = TransactionEvent.model_validate(raw)
        return Envelope(event, produced_at)
    except ValidationError as exc:
        original = raw if isinstance(raw, bytes) else json.dumps(raw, default=str).encode()
        return DeadLetter(_reason(exc), bytes(original))
    except Exception as exc:  # noqa: BLE001 - anything unparseable is a dead letter, never a crash
        original = raw if isinstance(raw, bytes) else repr(raw).encode()
        return DeadLetter(f"unparseable event: {type(exc).__name__}: {exc}", bytes(original))
