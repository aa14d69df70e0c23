"""Compact the velocity history: merge the live stream's small parquet files into large ones.

The feature dataflow writes one `stream-*.parquet` file per Bytewax snapshot (every 2 s by
default: about 43,000 files a day), and every training retrieval lists and opens each of them.
`python -m training.compact_history` (`make compact`) merges runs of small files, in time order,
into files of up to `--target-rows` rows, and is safe to run while the dataflow writes and
while trainings read:

* Only complete files are read (the dataflow renames a file into place once written).
  Within a merged file, rows identical in (user_id, event_timestamp, created_timestamp) are
  kept once, as the point-in-time join keeps them once.
* A merged file is renamed into place after a manifest (`.compaction-*.json`) naming the
  files it replaces.  From then on readers do not list those files
  (`feature_repo.parquet_files.live_files`, used by the offline store and the
  materialization engine), but one that listed them just before may still read them: a
  retrieval lists the directory once and reads its files twice.  So they stay for
  `--grace-s` seconds (default 1 h) and are deleted by a later run.  Readers that do not use
  `live_files` (Feast's own offline stores) see their rows twice meanwhile, which a
  point-in-time join keeps once (see above).
* A crash at any point loses nothing: merged files and manifests are fsynced before they are
  renamed into place; a manifest whose merged file is missing, or does not hold the rows the
  manifest says, is dropped with its sources kept (and the bad merged file removed).
  Temporary files a crash left behind (this job's or the dataflow's) are deleted once older
  than `TMP_MIN_AGE_S` (10 min).
* One run at a time: a run that finds another one running (a lock on `.compaction.lock`)
  does nothing.

Backfill files (`backfill-*`) are left alone: the backfill replaces them wholesale.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_repo.config import apply_env_defaults
from feature_repo.parquet_files import COMPACTION_MANIFESTS
from feature_repo.paths import velocity_history_dir

log = logging.getLogger(__name__)

PREFIX = "stream-"
TARGET_ROWS = 1_000_000
GRACE_S = 3600.0
TMP_MIN_AGE_S = 600.0  # a temporary file this old is a crash's leftover, not being written
MERGED_SUFFIX = re.compile(r"(-c[0-9a-f]{8})+$")
DEDUP_KEY = ("user_id", "event_timestamp", "created_timestamp")


@dataclass
class Compaction:
    """What one run did."""

    files_read: int = 0
    rows_read: int = 0
    files_written: int = 0
    rows_written: int = 0
    files_deleted: int = 0
    pending: int = 0  # replaced files kept until their grace period ends
    written: list[str] = field(default_factory=list)


def compact(directory: Path | None = None, target_rows: int = TARGET_ROWS,
            grace_s: float = GRACE_S, now: float | None = None) -> Compaction | None:
    """One compaction run over `directory` (default: the velocity history); see the module
    docstring.  None if another run holds the lock.  `now` (epoch seconds) is for tests."""
    directory = directory or velocity_history_dir()
    if not directory.is_dir():  # nothing streamed yet
        return Compaction()
    with (directory / ".compaction.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        return _compact(directory, target_rows, grace_s, time.time() if now is None else now)


def _compact(directory: Path, target_rows: int, grace_s: float, now: float) -> Compaction:
    out = Compaction()
    for tmp in directory.glob(".*.tmp"):  # a crashed writer's (the dataflow's or ours)
        try:
            if now - tmp.stat().st_mtime >= TMP_MIN_AGE_S:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    busy = _finish_earlier(directory, grace_s, now, out)
    small = []
    for path in sorted(directory.glob(f"{PREFIX}*.parquet")):
        if path.name in busy:
            continue
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows < target_rows:
            small.append((path, rows))
    for group in _groups(small, target_rows):
        _merge(directory, [p for p, _ in group], now, out)
    return out


def _finish_earlier(directory: Path, grace_s: float, now: float, out: Compaction) -> set[str]:
    """Delete the files replaced by earlier runs whose grace period is over; return the
    names of the files still in a grace period, as sources or merged files (not to be merged
    again before it ends)."""
    manifests = []
    for path in directory.glob(COMPACTION_MANIFESTS):
        try:
            m = json.loads(path.read_text())
            manifests.append((float(m["created"]), path, str(m["output"]),
                              [str(n) for n in m["sources"]], m.get("rows")))
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable compaction manifest %s: set aside, its sources kept", path)
            path.replace(path.with_name(path.name + ".bad"))
    busy: set[str] = set()
    for created, path, output, sources, rows in sorted(manifests):
        if not _complete(directory / output, rows):  # crashed before or while writing it
            (directory / output).unlink(missing_ok=True)
            path.unlink()
            continue
        if now - created < grace_s:
            busy.update([output, *sources])
            out.pending += len(sources)
            continue
        for name in sources:
            source = directory / name
            if source.exists():
                source.unlink()
                out.files_deleted += 1
        path.unlink()
    return busy


def _complete(merged: Path, rows: int | None) -> bool:
    try:
        return pq.ParquetFile(merged).metadata.num_rows == rows or rows is None
    except (OSError, pa.ArrowException):  # missing, or not a whole parquet file
        return False


def _groups(files: list[tuple[Path, int]], target_rows: int) -> list[list[tuple[Path, int]]]:
    """Consecutive runs of files of at most `target_rows` rows together; runs of one file
    are left as they are."""
    groups: list[list[tuple[Path, int]]] = []
    current: list[tuple[Path, int]] = []
    rows = 0
    for f in files:
        if current and rows + f[1] > target_rows:
            groups.append(current)
            current, rows = [], 0
        current.append(f)
        rows += f[1]
    groups.append(current)
    return [g for g in groups if len(g) > 1]


def _merge(directory: Path, sources: list[Path], now: float, out: Compaction) -> None:
    try:
        table = pa.concat_tables([pq.read_table(p) for p in sources],
                                 promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        log.warning("not merged, schemas differ: %s .. %s (%s)", sources[0].name,
                    sources[-1].name, exc)
        return
    out.files_read += len(sources)
    out.rows_read += table.num_rows
    table = _distinct(table)
    # Named after its first source (without earlier merge suffixes): the listing stays in
    # time order and names do not grow when a merged file is merged again.
    stem = MERGED_SUFFIX.sub("", sources[0].name.removesuffix(".parquet"))
    name = f"{stem}-c{uuid.uuid4().hex[:8]}.parquet"
    tmp = directory / f".{name}.tmp"
    with tmp.open("wb") as f:
        pq.write_table(table, f, row_group_size=128 * 1024)
        f.flush()
        os.fsync(f.fileno())
    manifest = directory / f".compaction-{uuid.uuid4().hex}.json"
    manifest_tmp = directory / f".{manifest.name}.tmp"
    with manifest_tmp.open("w") as f:
        json.dump({"output": name, "created": now, "rows": table.num_rows,
                   "sources": [p.name for p in sources]}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(manifest_tmp, manifest)
    os.replace(tmp, directory / name)  # from here on readers list it instead of its sources
    _fsync_dir(directory)
    out.files_written += 1
    out.rows_written += table.num_rows
    out.pending += len(sources)
    out.written.append(name)
    log.info("compacted %d files (%d rows) into %s", len(sources), table.num_rows, name)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _distinct(table: pa.Table) -> pa.Table:
    """The first of the rows that share `DEDUP_KEY` (the writer makes such rows identical:
    a replay after a crash rewrites the same rows)."""
    if not set(DEDUP_KEY) <= set(table.column_names):
        return table
    first = (table.select(list(DEDUP_KEY))
             .append_column("__i", pa.array(range(table.num_rows), pa.int64()))
             .group_by(list(DEDUP_KEY), use_threads=False)
             .aggregate([("__i", "min")]))
    if first.num_rows == table.num_rows:
        return table
    return table.take(np.sort(first["__i_min"].to_numpy()))


def _metrics() -> tuple[Any, Any, Any]:
    from prometheus_client import Counter, Gauge

    runs = Counter("fraud_history_compactions_total", "History compaction runs", ["outcome"])
    files = Counter("fraud_history_compaction_files_total",
                    "History files merged (read), written and deleted", ["action"])
    last = Gauge("fraud_history_compaction_last_success_timestamp_seconds",
                 "When the last history compaction run ended without error")
    return runs, files, last


def run_forever(directory: Path | None, target_rows: int, grace_s: float, every_s: float,
                metrics_host: str, metrics_port: int) -> None:
    """`compact` every `every_s` seconds, with Prometheus metrics on metrics_host:port (the
    docker-compose `history-compactor` service).  A failed run is logged and retried at the
    next period; the process only ends when it is stopped (stopping it mid-run is safe)."""
    from prometheus_client import start_http_server

    runs, files, last = _metrics()
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_host)
    while True:
        try:
            r = compact(directory, target_rows, grace_s)
        except Exception:  # noqa: BLE001 - keep the service up; the counter shows the failure
            log.exception("history compaction failed")
            runs.labels("failed").inc()
        else:
            if r is None:
                runs.labels("locked").inc()
            else:
                runs.labels("ok").inc()
                files.labels("read").inc(r.files_read)
                files.labels("written").inc(r.files_written)
                files.labels("deleted").inc(r.files_deleted)
                last.set_to_current_time()
                print(_summary(r), flush=True)
        time.sleep(every_s)


def _summary(r: Compaction) -> str:
    return (f"compaction: {r.files_read} files ({r.rows_read:,} rows) merged into "
            f"{r.files_written} ({r.rows_written:,} rows); {r.files_deleted} replaced files "
            f"deleted, {r.pending} kept for the grace period")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None,
                   help="history directory (default: $FRAUD_DATA_DIR/features/user_velocity)")
    p.add_argument("--target-rows", type=int, default=TARGET_ROWS,
                   help="rows per merged file (default %(default)s)")
    p.add_argument("--grace-s", type=float, default=GRACE_S,
                   help="seconds a replaced file is kept for running readers (default "
                        "%(default)s)")
    p.add_argument("--every-s", type=float, default=0.0,
                   help="run again every this many seconds, for ever (a service); default: once")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="with --every-s: address of the Prometheus /metrics endpoint")
    p.add_argument("--metrics-port", type=int, default=9103,
                   help="with --every-s: its port (0: none; default %(default)s)")
    a = p.parse_args(argv)
    apply_env_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.every_s > 0:
        run_forever(a.dir, a.target_rows, a.grace_s, a.every_s, a.metrics_host, a.metrics_port)
        return
    t0 = time.perf_counter()
    r = compact(a.dir, a.target_rows, a.grace_s)
    if r is None:
        print("compaction: another run holds the lock; nothing done")
        return
    print(f"{_summary(r)}; {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
