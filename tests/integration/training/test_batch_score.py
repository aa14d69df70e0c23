"""Batch scoring groups small days into one retrieval without changing what it writes.

`training.batch_score.day_groups` packs consecutive calendar days of at most `--chunk-rows`
transactions together; the output (one directory per day, the watermark) must be the same as
when every day is retrieved on its own.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import SIM_END
from training import batch_score

D = date(2026, 10, 1)


def _days(*offsets: int) -> list[date]:
    return [D + timedelta(days=k) for k in offsets]


def test_day_groups_pack_consecutive_days_up_to_the_chunk() -> None:
    days = _days(0, 1, 2, 3, 5, 6, 7)
    rows = dict(zip(days, [40, 50, 20, 100, 10, 0, 30], strict=True))
    assert batch_score.day_groups(days, rows, 100) == [
        _days(0, 1),  # 40 + 50; adding 20 would exceed 100
        _days(2),  # 20 + 100 would exceed 100
        _days(3),  # exactly the chunk size: alone
        _days(5, 6, 7),  # a gap in the calendar starts a new group
    ]
    assert batch_score.day_groups(days, rows, 1) == [[d] for d in days]  # every day alone
    assert batch_score.day_groups([], {}, 10) == []


@pytest.mark.integration
def test_grouped_days_write_what_single_days_write(
    feature_data: Path, trained_artifact: Path, tmp_path: Path
) -> None:
    start, end = SIM_END - timedelta(days=5), SIM_END - timedelta(days=1)
    days = batch_score.log_days(feature_data)
    sizes = [len(pd.read_parquet(feature_data / "transactions" / f"date={d.isoformat()}"))
             for d in days if start <= d < end]
    alone = batch_score.run(tmp_path / "alone", start, end, max(sizes), trained_artifact,
                            progress=False)
    grouped = batch_score.run(tmp_path / "grouped", start, end, 10 * max(sizes),
                              trained_artifact, progress=False)
    assert grouped.chunks == 1 and alone.chunks == len(sizes) == 4
    assert grouped.days == alone.days and grouped.rows == alone.rows == sum(sizes)
    for d in alone.days:
        a, b = (pd.read_parquet(tmp_path / run / f"date={d}").sort_values("transaction_id")
                .reset_index(drop=True) for run in ("alone", "grouped"))
        assert len(a) and a.equals(b), d
        assert (pd.to_datetime(b["event_timestamp"]).dt.date.astype(str) == d).all()
    marks = [json.loads((tmp_path / run / "_watermark.json").read_text())["watermark"]
             for run in ("alone", "grouped")]
    assert marks[0] == marks[1] == grouped.watermark
    assert not [p for p in (tmp_path / "grouped").iterdir() if p.name.startswith(".")]
