"""HTTP request and response bodies of the /v1 API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from feature_repo.contract import (
    SCHEMA_VERSION,
    Amount,
    AwareDatetime,
    Channel,
    Currency,
    Identifier,
    TransactionEvent,
    construct,
)


class TransactionIn(BaseModel):
    """A transaction to score; `event_timestamp` defaults to now and must carry a timezone."""

    model_config = ConfigDict(extra="forbid")

    transaction_id: Identifier
    user_id: Identifier
    merchant_id: Identifier
    amount: Amount  # the contract's: a JSON number, no "12.5" strings
    currency: Currency
    channel: Channel
    event_timestamp: AwareDatetime | None = None  # ISO-8601 with a zone; no epoch numbers

    def to_event(self) -> TransactionEvent:
        """The contract's event, without validating again: every field was validated on the
        way in with the contract's own types (Identifier, Amount, Currency, Channel,
        AwareDatetime in UTC), and the default time is an aware UTC now."""
        return construct(TransactionEvent, {
            "schema_version": SCHEMA_VERSION,  # its default, as model_construct sets it
            "transaction_id": self.transaction_id, "user_id": self.user_id,
            "merchant_id": self.merchant_id, "amount": self.amount, "currency": self.currency,
            "channel": self.channel, "event_timestamp": self.event_timestamp or datetime.now(UTC),
        }, defaulted=("schema_version",))


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transactions: list[TransactionIn] = Field(min_length=1, max_length=1000)


class FeatureValue(BaseModel):
    value: Any
    age_seconds: float | None = None  # stored features only: request time minus row time


class Reason(BaseModel):
    """One of the inputs that moved this score most."""

    feature: str
    value: float | None = Field(description="the model's input (null: missing)")
    contribution: float = Field(description="to the score's log-odds")
    direction: Literal["raises", "lowers"] = Field(
        description="whether this input pushed the score towards fraud or away from it")


class Explanation(BaseModel):
    """Why the score is what it is (TreeSHAP, exact for the tree ensemble).  In log-odds:
    `base_value` + the sum of `contributions` = logit(`score`) = ln(score / (1 - score)).
    The same numbers as `python -m training.explain` computes offline for the same row."""

    method: Literal["tree_shap"] = "tree_shap"
    units: Literal["log_odds"] = "log_odds"
    base_value: float = Field(description="the model's expected log-odds over its training data")
    contributions: dict[str, float] = Field(
        description="every model input's contribution to the score's log-odds (> 0: towards "
        "fraud), in the model's input order")
    reasons: list[Reason] = Field(description="the inputs with the largest |contribution|, "
                                  "largest first (at most 5; inputs that moved nothing are left out)")


class ScoreOut(BaseModel):
    transaction_id: str
    score: float = Field(ge=0, le=1)
    decision: Literal["approve", "review", "decline"]
    model_version: str
    feature_service: str
    missing_features: list[str]
    features: dict[str, FeatureValue] | None = None  # with ?explain=true
    explanation: Explanation | None = Field(
        default=None, description="with ?explain=true, for a model with an explainer")


class BatchOut(BaseModel):
    results: list[ScoreOut]


class FieldError(BaseModel):
    """One reason an input was refused."""

    field: str  # dotted path: "amount", "transactions.3.amount", "query.explain", or "body"
    message: str
    type: str  # pydantic's error type ("missing", "greater_than" ...) or "future"


class ValidationErrorOut(BaseModel):
    """The 422 body: the problems found, each naming its field (the first 50; then one entry
    of type `too_many_errors` saying how many more)."""

    detail: list[FieldError]


class ErrorOut(BaseModel):
    """Every other error body (401, 413, 503 ...)."""

    detail: str


# The error answers of the scoring routes, for their OpenAPI description.
SCORING_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the body could not be read as JSON"},
    401: {"model": ErrorOut, "description": "SERVING_API_KEY is set and X-API-Key is not it"},
    413: {"model": ErrorOut, "description": "request body larger than SERVING_MAX_BODY_BYTES"},
    422: {"model": ValidationErrorOut, "description": "invalid input, naming each field"},
    503: {"model": ErrorOut, "description": "online feature store unavailable, or the scorer "
          "overloaded (`{\"detail\": \"overloaded\"}`); both with Retry-After"},
}
