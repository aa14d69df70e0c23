"""Compacting the velocity history (Delta optimize + vacuum) changes no training frame and no
row a stock reader sees; the job's CLI and service loop."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from devenv.localproc import free_port
from feature_repo import history
from feature_repo.paths import velocity_history_dir
from training.compact_history import Compaction, compact, compact_table, main


def _split(table: pa.Table, directory: Path, parts: int) -> None:
    """`table` appended as `parts` stream commits in time order, as the dataflow writes them,
    and the sixth part appended twice (a replay after a crash rewrites the same rows)."""
    table = table.sort_by("event_timestamp")
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        history.append(directory, table.slice(lo, hi - lo), history.STREAM)
        if i == 5:
            history.append(directory, table.slice(lo, hi - lo), history.STREAM)


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


def _entities(rows: pa.Table, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    picked = rows.take(rng.choice(rows.num_rows, n, replace=False)).to_pandas()
    jitter = pd.to_timedelta(rng.integers(-60, 3600, n), unit="s")
    return pd.DataFrame({"user_id": picked["user_id"],
                         "event_timestamp": picked["event_timestamp"] + jitter,
                         "row": np.arange(n)})


def _stock_rows(directory: Path) -> list[tuple[Any, ...]]:
    """Every row a stock reader sees, as sorted tuples (duplicates kept)."""
    t = DeltaTable(str(directory)).to_pyarrow_table()
    return sorted(tuple(str(v) for v in r.values()) for r in t.to_pylist())


def test_compaction_keeps_every_training_frame_and_every_row(feature_data: Path, store: Any,
                                                             tmp_path: Path) -> None:
    rows = history.read(velocity_history_dir(feature_data)).drop_columns([history.ORIGIN])
    directory = tmp_path / "user_velocity"
    _split(rows, directory, parts=30)
    entities = _entities(rows)
    before = _frame(store, directory, entities)
    assert before["recent_txn_ts"].notna().sum() > len(entities) // 2
    stock = _stock_rows(directory)
    assert len(stock) > rows.num_rows  # the replayed part is there twice, for every reader
    files_before = history.live_files(directory)
    assert len(files_before) == 31

    size = sum(p.stat().st_size for p in files_before)
    r = compact(directory, target_mb=size / 3 / 2**20)
    assert r is not None and 2 <= r.files_added <= 4
    assert r.files_vacuumed == 0  # the table's retention: a running retrieval may read them
    assert all(p.exists() for p in files_before)
    after = history.live_files(directory)
    # Delta's bin packing leaves a file alone in its bin as it is (data-dependent sizes)
    kept = set(after) & set(files_before)
    assert len(kept) <= 1 and r.files_removed == 31 - len(kept)
    assert len(after) == r.files_added + len(kept)
    assert _stock_rows(directory) == stock
    pd.testing.assert_frame_equal(_frame(store, directory, entities), before)

    # an operator's choice: nothing kept (this run also merges the merged files further)
    gone = compact(directory, retention_hours=0)
    assert gone is not None and gone.files_vacuumed == r.files_removed + gone.files_removed
    live = set(history.live_files(directory))
    assert not any(p.exists() for p in files_before if p not in live)
    # every file left on disk is the table's (no checkpoint after so few commits)
    assert sorted(directory.glob("**/*.parquet")) == sorted(history.live_files(directory))
    assert _stock_rows(directory) == stock
    pd.testing.assert_frame_equal(_frame(store, directory, entities), before)


def _small_commits(directory: Path, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        history.append(directory, pa.table({"user_id": [f"u{i}", f"v{i}"], "v": [i, i]}),
                       history.STREAM)


def test_a_missing_table_is_nothing_to_do_and_a_crashed_write_is_vacuumed(
        tmp_path: Path) -> None:
    assert compact(tmp_path / "never-streamed") == Compaction()
    directory = tmp_path / "h"
    _small_commits(directory, 3)
    orphan = directory / "origin=stream" / "part-00000-crashed-before-its-commit.parquet"
    orphan.write_bytes(b"a data file whose commit never happened")
    r = compact(directory, retention_hours=0)
    assert r is not None and r.files_removed == 3 and r.files_added == 1
    assert r.files_vacuumed == 3 + 1 and not orphan.exists()
    assert history.read(directory).num_rows == 6


def test_backfill_rows_are_compacted_in_their_own_partition(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    _small_commits(directory, 2)
    for i in range(2):
        history.append(directory, pa.table({"user_id": [f"b{i}"], "v": [i]}), history.BACKFILL)
    r = compact(directory)
    assert r is not None and (r.files_removed, r.files_added) == (4, 2)
    assert sorted(p.parent.name for p in history.live_files(directory)) == [
        "origin=backfill", "origin=stream"]


def test_two_compactions_of_the_same_files_one_commits_the_other_conflicts(
        tmp_path: Path) -> None:
    """Two runs that loaded the same version (the race, made certain): the first commits, the
    second loses Delta's conflict check and changes nothing; no lock of ours.  deltalake 1.6.6
    committed both, each adding a merged copy of the rows (why it is pinned to 1.6.3)."""
    directory = tmp_path / "h"
    _small_commits(directory, 30)
    first, second = DeltaTable(str(directory)), DeltaTable(str(directory))
    assert compact_table(first).outcome == "ok"
    lost = compact_table(second)
    assert (lost.outcome, lost.files_removed, lost.files_added) == ("conflict", 0, 0)
    assert len(history.live_files(directory)) == 1  # the merged file
    assert history.read(directory).num_rows == 60  # never twice


def test_runs_at_once_never_duplicate_rows(tmp_path: Path) -> None:
    """Four runs in threads over 30 small files: the files are compacted once."""
    directory = tmp_path / "h"
    _small_commits(directory, 30)
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: compact(directory), range(4)))
    assert sorted(r.outcome for r in runs).count("ok") >= 1
    assert sum(r.files_removed for r in runs) == 30
    assert history.read(directory).num_rows == 60  # never twice


def test_a_backfill_during_compactions_leaves_exactly_its_rows(tmp_path: Path) -> None:
    """A compaction that rewrites the backfill's files while the backfill replaces them: one of
    the two commits first, the other conflicts (the compaction gives up, the backfill writes
    again); either way the table ends with the stream's rows and the new backfill's."""
    directory = tmp_path / "h"
    _small_commits(directory, 3)
    for i in range(40):
        history.append(directory, pa.table({"user_id": [f"old{i}"], "v": [i]}), history.BACKFILL)
    new = tmp_path / "new"
    for i in range(40):
        history.append(new, pa.table({"user_id": [f"new{i}"], "v": [i]}), history.BACKFILL)
    with ThreadPoolExecutor(2) as pool:
        compaction = pool.submit(compact, directory)
        assert history.replace(directory, new, history.BACKFILL) == 40
        assert compaction.result().outcome in ("ok", "conflict")
    users = history.read(directory)["user_id"].to_pylist()
    assert sorted(users) == sorted([f"u{i}" for i in range(3)] + [f"v{i}" for i in range(3)]
                                   + [f"new{i}" for i in range(40)])


def test_cli_reports_what_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "h"
    _small_commits(directory, 4)
    main(["--dir", str(directory)])
    assert "4 files compacted into 1, 0 unused files vacuumed" in capsys.readouterr().out
    main(["--dir", str(directory), "--retain-hours", "0"])
    assert "0 files compacted into 0, 4 unused files vacuumed" in capsys.readouterr().out
    assert len(list(directory.glob("**/*.parquet"))) == 1


def test_the_service_loop_compacts_and_exports_metrics(tmp_path: Path) -> None:
    """`--every-s` (the docker-compose `history-compactor`): runs again and again, with
    Prometheus metrics; stopped from outside."""
    directory = tmp_path / "h"
    _small_commits(directory, 4)
    port = free_port()
    log = (tmp_path / "compactor.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.compact_history", "--dir", str(directory),
         "--retain-hours", "0", "--every-s", "0.2", "--metrics-port", str(port)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, text = time.monotonic() + 60, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
            except httpx.HTTPError:
                text = ""
            if 'fraud_history_compaction_files_total{action="vacuumed"} 4.0' in text:
                break
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "compactor.log").read_text()
        assert 'fraud_history_compaction_files_total{action="removed"} 4.0' in text, text
        assert 'fraud_history_compaction_files_total{action="added"} 1.0' in text, text
        assert 'fraud_history_compaction_files_total{action="vacuumed"} 4.0' in text, text
        assert 'fraud_history_compactions_total{outcome="ok"}' in text
        assert "fraud_history_compaction_last_success_timestamp_seconds" in text
        assert history.read(directory).num_rows == 8
    finally:
        proc.kill()
        proc.wait()
        log.close()
