"""What one feature view contributes to a point-in-time join, independent of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path


@dataclass(frozen=True)
class ViewJoin:
    """One feature view's part of a point-in-time join.

    For an entity row at t: the row of `files` with the same keys and the greatest
    (`timestamp_field`, `created_field`) with timestamp <= t, unless older than t - ttl.
    """

    files: list[Path]  # exactly the files to read (a history table's current files)
    keys: dict[str, str]  # source column -> entity frame column
    timestamp_field: str
    created_field: str | None
    ttl: timedelta | None  # None or 0: never stale
    features: list[str]  # source columns
    names: list[str]  # their output names (prefixed with full_feature_names)
