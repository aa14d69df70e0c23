"""Batch scoring of a period of transactions with point-in-time features.

`python -m training.batch_score [--start YYYY-MM-DD] [--end YYYY-MM-DD] [--chunk-rows 200000]
[--out DIR] [--model DIR] [--data-dir DIR]`

Scores every transaction of the log (`training.retrieval.read_transactions`) with
start <= event day < end through the model's own feature service
(`training.retrieval.training_frame`: the same feature definitions and on-demand functions as
online, each transaction as of its own event time, joined on the `OFFLINE_ENGINE`: DuckDB or
Spark, identical scores), the online scorer's artifact loader
(`scoring.artifact.load_artifact`, hash-checked) and thresholds (`scoring.scorer.thresholds_for`
with the SERVING_* overrides).  Without `--model` the model is the one the scorer would serve.

Consecutive days of at most `--chunk-rows` transactions in all share one retrieval (its fixed
cost is paid per group, not per day); a bigger day is retrieved alone, in chunks.  Memory is
bounded by the raw transactions of one such group (at most `--chunk-rows`, or one day) plus one
chunk of `--chunk-rows` feature rows.
Output: `<out>/date=YYYY-MM-DD/part-NNNNN.parquet` with transaction_id, event_timestamp, score,
decision, model_version.  A day is written to a hidden directory and swapped in whole, so a
rerun overwrites a day idempotently and readers never see half a day.

Incremental runs: after each day is swapped in, `<out>/_watermark.json` records the last event
time scored.  Without `--start` a run continues from the watermark's day, which it scores again
in full (it may have grown since), so every transaction is in the output exactly once.  `--end` (exclusive)
defaults to the day after the last day in the log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from feature_repo.config import data_dir
from feature_repo.paths import transactions_dir
from scoring.artifact import Artifact, check_against_registry, load_artifact
from scoring.config import get_settings
from scoring.loader import resolve_model_path
from scoring.scorer import Thresholds, thresholds_for
from training.retrieval import entity_frame, open_store, read_transactions, training_frame

WATERMARK_FILE = "_watermark.json"
OUTPUT_SCHEMA = pa.schema([
    ("transaction_id", pa.string()),
    ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ("score", pa.float64()),
    ("decision", pa.string()),
    ("model_version", pa.string()),
])


@dataclass
class RunStats:
    days: list[str] = field(default_factory=list)
    rows: int = 0
    chunks: int = 0
    max_chunk_rows: int = 0
    watermark: str | None = None


def _midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def read_watermark(out: Path) -> datetime | None:
    path = out / WATERMARK_FILE
    if not path.is_file():
        return None
    return datetime.fromisoformat(json.loads(path.read_text())["watermark"])


def write_watermark(out: Path, watermark: datetime, model_version: str) -> None:
    """Atomically record the last event time scored (never moves backwards)."""
    current = read_watermark(out)
    if current is not None and current > watermark:
        watermark = current
    tmp = out / f".{WATERMARK_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"watermark": watermark.isoformat(), "model_version": model_version,
                               "updated_at": datetime.now(UTC).isoformat()}))
    os.replace(tmp, out / WATERMARK_FILE)


def log_days(root: Path) -> list[date]:
    """Days present in the hive-partitioned transaction log."""
    return sorted(date.fromisoformat(p.name[5:])
                  for p in transactions_dir(root).glob("date=*") if p.is_dir())


def score_frame(artifact: Artifact, thresholds: Thresholds, frame: pd.DataFrame) -> pa.Table:
    """Scores of a training-frame chunk, as the online scorer computes them."""
    x = frame[artifact.features].to_numpy(dtype="float64", na_value=np.nan)
    scores = artifact.model.predict_proba(x)[:, 1]
    return pa.table({
        "transaction_id": frame["transaction_id"].astype(str).tolist(),
        "event_timestamp": pd.to_datetime(frame["event_timestamp"], utc=True),
        "score": scores.astype("float64"),
        "decision": [thresholds.decide(float(s)) for s in scores],
        "model_version": [artifact.version] * len(frame),
    }, schema=OUTPUT_SCHEMA)


def _swap_in(out: Path, day: date, staged: Path) -> None:
    """Replace `out/date=day` by the staged directory (two renames; the old one is removed)."""
    final = out / f"date={day.isoformat()}"
    old = out / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def day_groups(days: list[date], rows: dict[date, int], chunk_rows: int) -> list[list[date]]:
    """Consecutive calendar days of at most `chunk_rows` transactions together (one retrieval
    for all); a bigger day alone (retrieved in chunks)."""
    groups: list[list[date]] = []
    size = 0
    for d in days:
        g = groups[-1] if groups else None
        if g and g[-1] + timedelta(days=1) == d and size + rows.get(d, 0) <= chunk_rows:
            g.append(d)
            size += rows.get(d, 0)
        else:
            groups.append([d])
            size = rows.get(d, 0)
    return groups


def score_days(store: Any, artifact: Artifact, thresholds: Thresholds, tx: pd.DataFrame,
               out: Path, days: list[date], chunk_rows: int, stats: RunStats,
               bar: tqdm) -> None:
    """Score `tx` (the transactions of `days`) in chunks; swap each day in whole, in order,
    then advance the watermark to its last event."""
    staged = {d: out / f".staging-{d.isoformat()}-{uuid.uuid4().hex[:8]}" for d in days}
    parts = dict.fromkeys(days, 0)
    try:
        for path in staged.values():
            path.mkdir(parents=True)
        for lo in range(0, len(tx), chunk_rows):
            chunk = tx.iloc[lo:lo + chunk_rows]
            frame = training_frame(store, artifact.feature_service, entity_frame(chunk),
                                   columns=["event_timestamp", *artifact.features])
            scored = score_frame(artifact, thresholds, frame)
            day_of = pd.to_datetime(frame["event_timestamp"], utc=True).dt.date.to_numpy()
            for d in days:
                mine = scored.filter(pa.array(day_of == d))
                if mine.num_rows:
                    pq.write_table(mine, staged[d] / f"part-{parts[d]:05d}.parquet")
                    parts[d] += 1
            stats.chunks += 1
            stats.max_chunk_rows = max(stats.max_chunk_rows, len(chunk))
            stats.rows += len(chunk)
            bar.update(len(chunk))
            del frame, scored
        day_of = pd.to_datetime(tx["event_timestamp"], utc=True).dt.date
        for d in days:
            _swap_in(out, d, staged[d])
            stats.days.append(d.isoformat())
            mine = tx["event_timestamp"][day_of == d]
            if len(mine):
                write_watermark(out, pd.Timestamp(mine.max()).to_pydatetime(), artifact.version)
    finally:
        for path in staged.values():
            shutil.rmtree(path, ignore_errors=True)


def run(out: Path, start: date | None, end: date | None, chunk_rows: int,
        model_path: Path | None = None, root: Path | None = None,
        review: float | None = None, decline: float | None = None,
        progress: bool = True) -> RunStats:
    """Score [start, end) into `out`, day by day in effect; see the module docstring."""
    if chunk_rows < 1:
        raise ValueError("--chunk-rows must be at least 1")
    root = root or data_dir()
    settings = get_settings()
    artifact = load_artifact(model_path or resolve_model_path(settings))
    thresholds = thresholds_for(
        artifact, review if review is not None else settings.review_threshold,
        decline if decline is not None else settings.decline_threshold)
    out.mkdir(parents=True, exist_ok=True)
    if start is None:
        mark = read_watermark(out)
        if mark is None:
            raise ValueError(f"no --start given and no watermark in {out}")
        start = mark.date()
    days = log_days(root)
    if end is None:
        end = days[-1] + timedelta(days=1) if days else start
    todo = [d for d in days if start <= d < end]
    store = open_store()
    check_against_registry(artifact, store)
    stats = RunStats()
    rows = {d: sum(pq.ParquetFile(f).metadata.num_rows
                   for f in (transactions_dir(root) / f"date={d.isoformat()}").glob("*.parquet"))
            for d in todo}
    with tqdm(total=sum(rows.values()), unit="txn", desc="batch score",
              disable=not progress) as bar:
        for group in day_groups(todo, rows, chunk_rows):
            tx = read_transactions(root, _midnight(group[0]),
                                   _midnight(group[-1] + timedelta(days=1)))
            bar.set_postfix_str(group[-1].isoformat())
            score_days(store, artifact, thresholds, tx, out, group, chunk_rows, stats, bar)
            del tx
    mark = read_watermark(out)
    stats.watermark = mark.isoformat() if mark else None
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", type=date.fromisoformat,
                   help="first day (UTC); default: continue from the watermark")
    p.add_argument("--end", type=date.fromisoformat,
                   help="first day not scored; default: the day after the log's last day")
    p.add_argument("--chunk-rows", type=int, default=200_000,
                   help="transactions per point-in-time retrieval (bounds memory)")
    p.add_argument("--out", type=Path, default=data_dir() / "scores")
    p.add_argument("--model", type=Path, help="artifact directory; default: the served model")
    p.add_argument("--data-dir", type=Path, help="root of the transaction log (FRAUD_DATA_DIR)")
    a = p.parse_args(argv)
    try:
        stats = run(a.out, a.start, a.end, a.chunk_rows, a.model, a.data_dir)
    except ValueError as exc:
        p.error(str(exc))
    print(f"scored {stats.rows:,} transactions of {len(stats.days)} days in {stats.chunks} "
          f"chunks into {a.out}; watermark {stats.watermark}")


if __name__ == "__main__":
    main()
