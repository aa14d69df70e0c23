"""Where the offline data lives under `$FRAUD_DATA_DIR` (one place, imported everywhere)."""

from __future__ import annotations

from pathlib import Path

from feature_repo.config import data_dir


def transactions_dir(root: Path | None = None) -> Path:
    """Transaction log, hive-partitioned by day: `date=YYYY-MM-DD/part-0.parquet`."""
    return (root or data_dir()) / "transactions"


def labels_path(root: Path | None = None) -> Path:
    return (root or data_dir()) / "labels.parquet"


def customers_path(root: Path | None = None) -> Path:
    """Customer records: `user_id, home_utc_offset_hours` (the card holder's home time zone)."""
    return (root or data_dir()) / "customers.parquet"


def features_dir(root: Path | None = None) -> Path:
    return (root or data_dir()) / "features"


def velocity_history_dir(root: Path | None = None) -> Path:
    """Offline history of `user_velocity_fv`: a Delta Lake table (`feature_repo.history`)."""
    return features_dir(root) / "user_velocity"
