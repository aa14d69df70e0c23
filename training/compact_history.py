"""Compact the velocity history: Delta Lake's own optimize (compaction) and vacuum.

The feature dataflow appends one small file per partition and Bytewax snapshot (every 2 s by
default: tens of thousands of files a day) to the history table (`feature_repo.history`), and
every training retrieval opens each of them.  `python -m training.compact_history`
(`make compact`) runs, on that table:

* `DeltaTable.optimize.compact()`: bin-packs each partition's small files into files of about
  `--target-mb`, in one commit that removes the small files from the table and adds the merged
  ones.  Readers of an earlier version keep reading the files they listed (still on disk);
  readers of the new version read the merged ones: nobody sees a row twice or misses one.
  It runs alongside the dataflow's appends (blind appends do not conflict with a compaction).
* `DeltaTable.vacuum()`: deletes the files the table stopped using more than the table's
  retention ago (`history.DELETED_FILE_RETENTION`, 1 h: a retrieval lists the files once and
  reads them for less than that) and files of writes that crashed before their commit.

A crash at any point loses nothing: a compaction that did not commit changed nothing (its
files are never read, and a later vacuum deletes them).  Runs need no lock of ours: Delta's
conflict check at commit decides.  Two compactions of the same files, or a compaction and a
backfill that replaced them: the first commits, the other conflicts; a compaction that loses
reports `conflict` and changes nothing (the next period compacts again), a backfill retries
its commit.  (deltalake is pinned to 1.6.3: 1.6.6's checker lets a second compaction of the
same files commit too, adding a second merged copy of their rows; tested in
tests/integration/training/test_compact_history.py.)
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError
from prometheus_client import Counter, Gauge, start_http_server

from feature_repo import history
from feature_repo.config import apply_env_defaults
from feature_repo.paths import velocity_history_dir

log = logging.getLogger(__name__)

TARGET_MB = 256


@dataclass
class Compaction:
    """What one run did."""

    files_removed: int = 0  # small files the compaction took out of the table
    files_added: int = 0  # merged files it put in
    files_vacuumed: int = 0  # files deleted from storage
    version: int | None = None  # the table's version afterwards (None: no table yet)
    outcome: str = "ok"  # or "conflict": another commit changed the same files first


def compact(directory: Path | None = None, target_mb: float = TARGET_MB,
            retention_hours: int | None = None) -> Compaction:
    """One run over the history table at `directory` (default: the velocity history): compact,
    then vacuum files unused for `retention_hours` (default: the table's retention; a shorter
    one may delete files a running retrieval still reads).  Outcome `conflict` if another
    compaction or a backfill changed the same files first; then nothing changed."""
    directory = directory or velocity_history_dir()
    if not history.is_table(directory):  # nothing written yet
        return Compaction()
    return compact_table(DeltaTable(str(directory)), target_mb, retention_hours)


def compact_table(table: DeltaTable, target_mb: float = TARGET_MB,
                  retention_hours: int | None = None) -> Compaction:
    """`compact` on `table` as loaded (a snapshot that other commits may have passed since:
    then Delta's conflict check decides at commit)."""
    try:
        metrics = table.optimize.compact(target_size=int(target_mb * 2**20))
    except CommitFailedError as exc:
        log.warning("compaction not committed: %s", exc)
        return Compaction(version=table.version(), outcome="conflict")
    vacuumed = table.vacuum(
        retention_hours=retention_hours,
        dry_run=False, enforce_retention_duration=retention_hours is None, full=True)
    out = Compaction(files_removed=int(metrics["numFilesRemoved"]),
                     files_added=int(metrics["numFilesAdded"]),
                     files_vacuumed=len(vacuumed), version=table.version())
    log.info("history %s: %s", table.table_uri, summary(out))
    return out


def summary(r: Compaction) -> str:
    return (f"{r.files_removed} files compacted into {r.files_added}, {r.files_vacuumed} "
            f"unused files vacuumed; table version {r.version}")


def run_forever(directory: Path | None, target_mb: float, retention_hours: int | None,
                every_s: float, metrics_host: str, metrics_port: int) -> None:
    """`compact` every `every_s` seconds, with Prometheus metrics on metrics_host:port (the
    docker-compose `history-compactor` service).  A failed run is logged and retried at the
    next period; the process only ends when it is stopped (stopping it mid-run is safe)."""
    runs = Counter("fraud_history_compactions_total", "History compaction runs", ["outcome"])
    files = Counter("fraud_history_compaction_files_total",
                    "History files compacted (removed from the table), added and vacuumed",
                    ["action"])
    last = Gauge("fraud_history_compaction_last_success_timestamp_seconds",
                 "When the last history compaction run ended without error")
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_host)
    while True:
        try:
            r = compact(directory, target_mb, retention_hours)
        except Exception:  # noqa: BLE001 - keep the service up; the counter shows the failure
            log.exception("history compaction failed")
            runs.labels("failed").inc()
        else:
            runs.labels(r.outcome).inc()
            if r.outcome == "ok":
                files.labels("removed").inc(r.files_removed)
                files.labels("added").inc(r.files_added)
                files.labels("vacuumed").inc(r.files_vacuumed)
                last.set_to_current_time()
        time.sleep(every_s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None,
                   help="history table (default: $FRAUD_DATA_DIR/features/user_velocity)")
    p.add_argument("--target-mb", type=float, default=TARGET_MB,
                   help="size of a compacted file in MiB (default %(default)s)")
    p.add_argument("--retain-hours", type=int, default=None,
                   help="vacuum files unused for this long (default: the table's retention, "
                        "1 h; shorter may break running retrievals)")
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
        run_forever(a.dir, a.target_mb, a.retain_hours, a.every_s, a.metrics_host,
                    a.metrics_port)
        return
    t0 = time.perf_counter()
    r = compact(a.dir, a.target_mb, a.retain_hours)
    if r.outcome == "conflict":
        print("compaction: another compaction or a backfill changed the same files first; "
              "nothing changed")
        return
    print(f"compaction: {summary(r)}; {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
