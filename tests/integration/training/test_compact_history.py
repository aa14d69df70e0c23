"""Compacting the velocity history changes no training frame and loses no row, at any point."""

from __future__ import annotations

import copy
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_repo.parquet_files import live_files
from feature_repo.paths import velocity_history_dir
from training.compact_history import DEDUP_KEY, Compaction, compact, main

GRACE_S = 600.0


def _history(feature_data: Path) -> pa.Table:
    files = sorted(velocity_history_dir(feature_data).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in files])


def _split(table: pa.Table, directory: Path, parts: int) -> list[Path]:
    """`table` as `parts` stream files in time order, as the dataflow writes them, and the
    sixth part written twice (a replay after a crash rewrites the same rows)."""
    directory.mkdir(parents=True)
    table = table.sort_by("event_timestamp")
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    paths = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        path = directory / f"stream-p0-{1_000_000 + i:020d}-{i:08x}.parquet"
        pq.write_table(table.slice(lo, hi - lo), path)
        paths.append(path)
    replay = directory / f"stream-p0-{1_000_005:020d}-replay00.parquet"  # right after it
    pq.write_table(pq.read_table(paths[5]), replay)
    return [*paths, replay]


def _view(store: Any, directory: Path) -> Any:
    """The registered `user_velocity_fv` reading its offline history from `directory`."""
    from feast import FileSource

    fv = copy.copy(store.get_feature_view("user_velocity_fv"))
    fv.batch_source = FileSource(name="compaction_test_source", path=str(directory),
                                 timestamp_field="event_timestamp",
                                 created_timestamp_column="created_timestamp")
    return fv


def _frame(store: Any, directory: Path, entities: pd.DataFrame) -> pd.DataFrame:
    from feature_repo.offline_store import asof_join

    refs = [f"user_velocity_fv:{f}" for f in ("recent_txn_ts", "recent_amounts",
                                              "recent_merchants", "known_merchants")]
    out = asof_join(entities, [_view(store, directory)], refs, full_feature_names=False).to_pandas()
    for col in out.columns[3:]:
        out[col] = out[col].map(lambda v: None if v is None else list(v))
    return out


def _entities(history: pa.Table, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = history.take(rng.choice(history.num_rows, n, replace=False)).to_pandas()
    jitter = pd.to_timedelta(rng.integers(-60, 3600, n), unit="s")
    return pd.DataFrame({"user_id": rows["user_id"],
                         "event_timestamp": rows["event_timestamp"] + jitter,
                         "row": np.arange(n)})


def _rows(directory: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in directory.glob("*.parquet"))


def test_compaction_keeps_every_training_frame(feature_data: Path, store: Any,
                                               tmp_path: Path) -> None:
    history = _history(feature_data)
    directory = tmp_path / "user_velocity"
    sources = _split(history, directory, parts=30)
    entities = _entities(history)
    before = _frame(store, directory, entities)
    assert before["recent_txn_ts"].notna().sum() > len(entities) // 2

    # at most 11 of the 31 files' rows per merged file: three merged files, none left alone
    target = int(history.num_rows * 0.38)
    first = compact(directory, target_rows=target, grace_s=GRACE_S, now=1000.0)
    assert first is not None
    assert (first.files_read, first.files_written) == (len(sources), 3)
    assert first.rows_read == history.num_rows + pq.ParquetFile(sources[5]).metadata.num_rows
    distinct = history.group_by(list(DEDUP_KEY)).aggregate([]).num_rows
    assert first.rows_written == distinct < first.rows_read  # the replayed rows kept once
    assert first.files_deleted == 0 and first.pending == len(sources)
    assert all(p.exists() for p in sources)  # a running retrieval may still read them
    assert [p.name for p in live_files(directory)] == sorted(first.written)  # new ones don't
    pd.testing.assert_frame_equal(_frame(store, directory, entities), before)

    # within the grace period: nothing deleted, nothing compacted again
    again = compact(directory, target_rows=target, grace_s=GRACE_S,
                    now=1000.0 + GRACE_S - 1)
    assert again is not None
    assert (again.files_read, again.files_deleted, again.pending) == (0, 0, len(sources))

    done = compact(directory, target_rows=target, grace_s=GRACE_S,
                   now=1000.0 + GRACE_S)
    assert done is not None
    assert done.files_deleted == len(sources) and done.pending == 0
    assert not any(p.exists() for p in sources) and not list(directory.glob(".compaction-*"))
    assert sorted(p.name for p in directory.glob("*.parquet")) == sorted(first.written)
    assert _rows(directory) == distinct
    pd.testing.assert_frame_equal(_frame(store, directory, entities), before)


def _small_files(directory: Path, n: int, start: int = 0) -> list[Path]:
    directory.mkdir(exist_ok=True)
    paths = [directory / f"stream-p0-{i:020d}-{i:08x}.parquet" for i in range(start, start + n)]
    for i, p in enumerate(paths, start):
        pq.write_table(pa.table({"user_id": [f"u{i}", f"v{i}"], "v": [i, i]}), p)
    return paths


def test_a_crash_before_the_merged_file_is_in_place_keeps_the_sources(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    sources = _small_files(directory, 3)
    # a manifest written, its merged file never renamed into place
    (directory / ".compaction-dead.json").write_text(json.dumps(
        {"output": "stream-p0-missing.parquet", "created": 0.0, "rows": 6,
         "sources": [p.name for p in sources]}))
    partial = directory / ".stream-p0-missing.parquet.tmp"
    partial.write_bytes(b"partial")
    os.utime(partial, (100.0, 100.0))
    young = directory / ".stream-p0-being-written.parquet.tmp"  # the dataflow's, in progress
    young.write_bytes(b"partial")
    r = compact(directory, target_rows=100, grace_s=3, now=1000.0)
    assert r is not None
    assert r.files_deleted == 0 and r.files_read == 3  # the sources are compacted afresh
    assert not (directory / ".compaction-dead.json").exists()
    assert not partial.exists() and young.exists()  # only a crash's leftover is removed
    assert _rows(directory) == 6 + 6  # merged + sources during the grace period
    done = compact(directory, target_rows=100, grace_s=3, now=1003.0)
    assert done is not None and done.files_deleted == 3
    assert _rows(directory) == 6


def test_a_torn_merged_file_is_removed_and_its_sources_kept(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    sources = _small_files(directory, 3)
    first = compact(directory, target_rows=100, grace_s=60, now=0.0)
    assert first is not None and len(first.written) == 1
    merged = directory / first.written[0]
    merged.write_bytes(merged.read_bytes()[:-20])  # what a power loss could leave
    (directory / ".compaction-junk.json").write_text('{"output": ')  # a torn manifest
    again = compact(directory, target_rows=100, grace_s=60, now=100.0)
    assert again is not None and again.files_deleted == 0
    assert not merged.exists() and all(p.exists() for p in sources)
    assert (directory / ".compaction-junk.json.bad").exists()
    assert again.files_read == 3 and again.rows_written == 6  # merged afresh


def test_merged_names_do_not_grow_and_a_missing_directory_is_nothing_to_do(
        tmp_path: Path) -> None:
    assert compact(tmp_path / "never-streamed") == Compaction()
    directory = tmp_path / "h"
    names = []
    for run in range(25):  # each run: two new files merged with the previous merged file
        _small_files(directory, 2, start=2 * run)
        r = compact(directory, target_rows=1000, grace_s=0, now=float(run))
        assert r is not None
        names += r.written
    assert len({len(n) for n in names}) == 1  # one length: no suffix added per run
    live = live_files(directory)  # the last merged file; its sources wait for the next run
    assert [p.name for p in live] == names[-1:]
    assert pq.read_table(live[0]).num_rows == 2 * 2 * 25


def test_backfill_and_large_files_are_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    directory.mkdir()
    small = pa.table({"user_id": ["u"], "v": [1]})
    pq.write_table(small, directory / "backfill-p0-1.parquet")
    pq.write_table(small, directory / "backfill-p0-2.parquet")
    pq.write_table(pa.table({"user_id": ["u"] * 10, "v": list(range(10))}),
                   directory / "stream-p0-1.parquet")
    pq.write_table(small, directory / "stream-p0-2.parquet")
    r = compact(directory, target_rows=10, grace_s=0)
    assert r is not None and (r.files_read, r.files_written) == (0, 0)  # one small stream file: nothing to merge
    assert len(list(directory.glob("*.parquet"))) == 4


def test_cli_reports_what_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "h"
    directory.mkdir()
    for i in range(4):
        pq.write_table(pa.table({"user_id": [f"u{i}"], "v": [i]}),
                       directory / f"stream-p0-{i}.parquet")
    main(["--dir", str(directory), "--target-rows", "10", "--grace-s", "0"])
    assert "4 files (4 rows) merged into 1 (4 rows)" in capsys.readouterr().out
    main(["--dir", str(directory), "--grace-s", "0"])
    assert "4 replaced files deleted" in capsys.readouterr().out
    assert [pq.read_table(p).num_rows for p in directory.glob("*.parquet")] == [4]


def test_one_run_at_a_time(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    directory.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"user_id": [f"u{i}"]}), directory / f"stream-p0-{i}.parquet")
    with (directory / ".compaction.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert compact(directory, grace_s=0) is None
        assert len(list(directory.glob("*.parquet"))) == 2
    r = compact(directory, grace_s=0)
    assert r is not None and r.files_written == 1


def test_the_service_loop_compacts_and_exports_metrics(tmp_path: Path) -> None:
    """`--every-s` (the docker-compose `history-compactor`): runs again and again, with
    Prometheus metrics; stopped from outside."""
    import subprocess
    import sys
    import time

    import httpx

    from devenv.localproc import free_port

    directory = tmp_path / "h"
    _small_files(directory, 4)
    port = free_port()
    log = (tmp_path / "compactor.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.compact_history", "--dir", str(directory),
         "--grace-s", "0", "--every-s", "0.2", "--metrics-port", str(port)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, text = time.monotonic() + 60, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
            except httpx.HTTPError:
                text = ""
            if 'fraud_history_compaction_files_total{action="deleted"} 4.0' in text:
                break
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "compactor.log").read_text()
        assert 'fraud_history_compaction_files_total{action="read"} 4.0' in text, text
        assert 'fraud_history_compaction_files_total{action="deleted"} 4.0' in text, text
        assert "fraud_history_compaction_last_success_timestamp_seconds" in text
        assert [pq.read_table(p).num_rows for p in directory.glob("*.parquet")] == [8]
    finally:
        proc.kill()
        proc.wait()
        log.close()
