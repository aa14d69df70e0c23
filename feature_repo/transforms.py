"""Request-time transaction features (engine-free; run by `transaction_odfv`).

Time of day is taken relative to the card holder, never from the server's UTC clock alone: the
hour in the user's home time zone (customer records) and the distance in hours from the user's
usual hour (the circular mean of their last 30 days).  A 03:00 UTC purchase is mid-morning for
a customer in Tokyo and the middle of the night for one in Berlin.
"""

from __future__ import annotations

import math
from typing import Any

US_PER_DAY = 86_400_000_000
US_PER_HOUR = 3_600_000_000


def _present(v: float | None) -> bool:
    return v is not None and not math.isnan(v)


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def transaction_features(
    amount: float, channel: str, request_ts_us: int, mean_30d: float | None,
    std_30d: float | None, utc_offset_hours: float | None = None,
    usual_hour_30d: float | None = None,
) -> dict[str, Any]:
    """Request-time features of one transaction relative to the user's profile.

    Hours are fractional (03:30 is 3.5).  `txn_hours_from_usual_30d` is the distance round the
    clock, 0 to 12.  Missing values are NaN (Feast cannot type a None output); the model
    imputes them.
    """
    hour_utc = (request_ts_us % US_PER_DAY) / US_PER_HOUR
    has_mean = _present(mean_30d) and mean_30d > 0  # type: ignore[operator]
    has_std = has_mean and _present(std_30d) and std_30d > 0  # type: ignore[operator]
    if _finite(utc_offset_hours):
        hour_local = (hour_utc + utc_offset_hours + 24.0) % 24.0  # type: ignore[operator]
    else:
        hour_local = math.nan
    if _finite(usual_hour_30d):
        gap = abs(hour_utc - usual_hour_30d)  # type: ignore[operator]
        from_usual = min(gap, 24.0 - gap)
    else:
        from_usual = math.nan
    return {
        "txn_amount_log": math.log1p(amount),
        "txn_amount_to_mean_30d": amount / mean_30d if has_mean else math.nan,  # type: ignore[operator]
        "txn_amount_zscore_30d": (amount - mean_30d) / std_30d if has_std else math.nan,  # type: ignore[operator]
        "txn_hour_local": hour_local,
        "txn_hours_from_usual_30d": from_usual,
        "txn_is_online": int(channel == "online"),
        "txn_is_atm": int(channel == "atm"),
    }


TRANSACTION_FEATURES = (
    "txn_amount_log",
    "txn_amount_to_mean_30d",
    "txn_amount_zscore_30d",
    "txn_hour_local",
    "txn_hours_from_usual_30d",
    "txn_is_online",
    "txn_is_atm",
)
