"""Velocity backfill: replay the transaction log through the live feature dataflow.

Runs `streaming.flow.build_flow` (the very flow the Kafka worker runs) over the
day-partitioned log into a private staging table, then makes its rows the `backfill` rows of
`user_velocity_fv`'s offline history table (`$FRAUD_DATA_DIR/features/user_velocity`, see
`feature_repo.history`) in one Delta commit: readers see the earlier backfill's rows until then,
the new ones after, never both or neither, and the rows the live stream wrote (origin
`stream`) are kept.  A run that fails leaves the table as it was.  Invalid, late and future
records (more than `FRAUD_MAX_FUTURE_SECONDS` ahead of the wall clock: the log has no ingestion
time) go to `$FRAUD_DATA_DIR/dlq/backfill.*.jsonl`, as bounded JSON like the live DLQ's.
Online values come from `feast materialize`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from bytewax.inputs import StatefulSourcePartition
from bytewax.testing import run_main

from feature_repo import history
from feature_repo.config import apply_env_defaults, data_dir
from feature_repo.paths import transactions_dir, velocity_history_dir
from feature_repo.progress import Progress, progress, show_summaries
from streaming.flow import build_flow
from streaming.sources import JsonlDeadLetterSink, ParquetLogSource
from streaming.velocity_sink import VelocitySink


class _CountedPartition(StatefulSourcePartition[dict[str, Any], Any]):
    """The log's partition, reporting every batch it hands the flow to a progress bar."""

    def __init__(self, inner: StatefulSourcePartition[dict[str, Any], Any], bar: Progress):
        self._inner, self._bar = inner, bar

    def next_batch(self) -> list[dict[str, Any]]:
        batch = list(self._inner.next_batch())
        self._bar.update(len(batch))
        return batch

    def next_awake(self) -> Any:
        return self._inner.next_awake()

    def snapshot(self) -> Any:
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class _CountedLogSource(ParquetLogSource):
    def __init__(self, directory: Path, batch_size: int, bar: Progress) -> None:
        super().__init__(directory, batch_size)
        self._bar = bar

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> Any:
        return _CountedPartition(super().build_part(step_id, for_part, resume_state), self._bar)


STALE_STAGING_S = 86_400.0


def backfill(root: Path | None = None, batch_size: int = 5000) -> int:
    """Rebuild the backfill rows of the velocity history; return their number."""
    root = root or data_dir()
    out = velocity_history_dir(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    dlq = root / "dlq" / "backfill"
    for old in dlq.parent.glob("backfill.*.jsonl"):
        old.unlink()
    # next to the table (same storage), hidden from anything listing the features directory;
    # a killed run's is removed by the next run a day later (no backfill runs that long)
    for stale in out.parent.glob(f".{out.name}-backfill-*"):
        if time.time() - stale.stat().st_mtime > STALE_STAGING_S:
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-backfill-", dir=out.parent))
    events = sum(pq.ParquetFile(f).metadata.num_rows
                 for f in transactions_dir(root).glob("*/*.parquet"))
    try:
        # progress: events read from the log (a bar on a terminal, one INFO line at the end)
        with progress("velocity backfill", total=events, unit="events") as bar:
            flow = build_flow(
                _CountedLogSource(transactions_dir(root), batch_size, bar),
                VelocitySink(None, staging, prefix=history.BACKFILL),
                JsonlDeadLetterSink(dlq),
                flow_id="velocity_backfill",
            )
            run_main(flow)
            rows = history.replace(out, staging, history.BACKFILL)
            bar.note = f"({rows:,} velocity rows)"
        return rows
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    apply_env_defaults()
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    show_summaries()
    t0 = time.perf_counter()
    n = backfill()
    dt = time.perf_counter() - t0
    print(f"velocity backfill: {n:,} rows in {dt:.1f}s ({n / max(dt, 1e-9):,.0f} events/s)")


if __name__ == "__main__":
    main()
