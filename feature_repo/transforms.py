"""Request-time transaction features (engine-free; run by `transaction_odfv`)."""

from __future__ import annotations

import math
from typing import Any


def transaction_features(
    amount: float, channel: str, request_ts_us: int, mean_30d: float | None, std_30d: float | None
) -> dict[str, Any]:
    """Request-time features of one transaction relative to the user's 30-day profile.

    Missing values are NaN (Feast cannot type a None output); the model imputes them.
    """
    hour = (request_ts_us // 3_600_000_000) % 24
    has_mean = mean_30d is not None and not math.isnan(mean_30d) and mean_30d > 0
    has_std = has_mean and std_30d is not None and not math.isnan(std_30d) and std_30d > 0
    return {
        "txn_amount_log": math.log1p(amount),
        "txn_amount_to_mean_30d": amount / mean_30d if has_mean else math.nan,  # type: ignore[operator]
        "txn_amount_zscore_30d": (amount - mean_30d) / std_30d if has_std else math.nan,  # type: ignore[operator]
        "txn_hour_of_day": int(hour),
        "txn_is_night": int(hour < 6),
        "txn_is_online": int(channel == "online"),
        "txn_is_atm": int(channel == "atm"),
    }


TRANSACTION_FEATURES = (
    "txn_amount_log",
    "txn_amount_to_mean_30d",
    "txn_amount_zscore_30d",
    "txn_hour_of_day",
    "txn_is_night",
    "txn_is_online",
    "txn_is_atm",
)
