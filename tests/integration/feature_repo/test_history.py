"""The offline history table (`feature_repo.history`) under concurrency: appends from two
processes all land; readers (stock `deltalake`, DuckDB over its dataset, and the project's
`live_files`) never see a duplicate or a partial commit while the history is compacted or the
backfill's rows are replaced."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from feature_repo import history
from feature_repo.paths import velocity_history_dir
from tests.conftest import PROJECT

ROWS_PER_BATCH = 7

# One stream process appending `n` flushes of ROWS_PER_BATCH rows, row ids
# "<tag>-<flush>-<row>", each flush one commit (`history.append`, under the dataflow's
# HistoryWriter), from `start` (epoch seconds) on; prints when it started and ended.
APPENDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import pyarrow as pa
    from feature_repo import history
    directory, tag, n, pause = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    time.sleep(max(0.0, float(sys.argv[5]) - time.time()))
    began = time.time()
    for b in range(n):
        ids = [f"{tag}-{b}-{r}" for r in range(ROWS)]
        history.append(directory, pa.table({"id": ids, "batch": [f"{tag}-{b}"] * len(ids)}),
                       "stream")
        time.sleep(pause)
    print(began, time.time())
""").replace("ROWS", str(ROWS_PER_BATCH))


def _appender(directory: Path, tag: str, n: int, pause: float = 0.0,
              start: float = 0.0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", APPENDER, str(directory), tag, str(n),
                             str(pause), str(start)], cwd=PROJECT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen[str]) -> tuple[float, float]:
    """When the appender started and ended appending."""
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    began, ended = out.split()[-2:]
    return float(began), float(ended)


def _check(ids: list[str], batches: list[str], where: str) -> set[str]:
    """No row twice, and every flush (commit) whole: all its rows or none."""
    dup = [i for i, c in Counter(ids).items() if c > 1]
    assert not dup, f"{where}: duplicated rows {dup[:5]}"
    partial = {b: c for b, c in Counter(batches).items() if c != ROWS_PER_BATCH}
    assert not partial, f"{where}: partial commits {partial}"
    return set(batches)


def _read_all_ways(directory: Path) -> list[set[str]]:
    """The flushes each reader sees: stock deltalake, DuckDB over its dataset, and DuckDB over
    `history.live_files` (how the offline store and materialization read)."""
    seen = []
    t = DeltaTable(str(directory)).to_pyarrow_table(columns=["id", "batch"])
    seen.append(_check(t["id"].to_pylist(), t["batch"].to_pylist(), "deltalake"))
    con = duckdb.connect()
    con.register("history", history.dataset(directory))  # no DuckDB extension involved
    rows = con.sql("SELECT id, batch FROM history").fetchall()
    seen.append(_check([r[0] for r in rows], [r[1] for r in rows], "duckdb over the dataset"))
    files = [str(p) for p in history.live_files(directory)]
    rows = con.sql(f"SELECT id, batch FROM read_parquet({files!r})").fetchall()
    con.close()
    seen.append(_check([r[0] for r in rows], [r[1] for r in rows], "live_files"))
    return seen


def test_appends_from_two_processes_all_land(tmp_path: Path) -> None:
    directory = tmp_path / "h"  # both processes create the table: they race from the start
    start = time.time() + 3  # both imported by then
    procs = [_appender(directory, tag, 40, start=start) for tag in ("a", "b")]
    (a_began, a_ended), (b_began, b_ended) = (_wait(p) for p in procs)
    assert a_began < b_ended and b_began < a_ended  # they did append at the same time
    expected = {f"{tag}-{b}" for tag in ("a", "b") for b in range(40)}
    for seen in _read_all_ways(directory):
        assert seen == expected
    table = DeltaTable(str(directory))
    writes = [h for h in table.history() if h["operation"] == "WRITE"]
    assert len(writes) == 80  # one commit per flush


def test_readers_see_every_row_once_while_the_stream_appends_and_compaction_runs(
        tmp_path: Path) -> None:
    directory = tmp_path / "h"
    first = _appender(directory, "w", 1)
    _wait(first)
    appender = _appender(directory, "a", 100, pause=0.01)
    compactor = subprocess.Popen(
        [sys.executable, "-m", "training.compact_history", "--dir", str(directory),
         "--every-s", "0.05", "--metrics-port", "0"],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reads, last = 0, 0
    try:
        while appender.poll() is None:
            seen = _read_all_ways(directory)
            counts = [len(s) for s in seen]
            assert min(counts) >= last, counts  # no reader goes back in time
            last = min(counts)
            reads += 1
        _wait(appender)
        time.sleep(0.5)  # a compaction of the last appends
        assert compactor.poll() is None, compactor.communicate()[0]
    finally:
        compactor.kill()
        log = compactor.communicate()[0]
    compactions = [h for h in DeltaTable(str(directory)).history() if h["operation"] == "OPTIMIZE"]
    assert reads >= 5 and len(compactions) >= 3, (reads, log)
    expected = {"w-0"} | {f"a-{b}" for b in range(100)}
    for seen in _read_all_ways(directory):
        assert seen == expected
    assert len(history.live_files(directory)) < 20, log


def _batch(tag: str, n: int) -> pa.Table:
    return pa.table({"id": [f"{tag}-{b}-{r}" for b in range(n) for r in range(ROWS_PER_BATCH)],
                     "batch": [f"{tag}-{b}" for b in range(n) for _ in range(ROWS_PER_BATCH)]})


def test_a_backfill_replaces_its_rows_in_one_commit_and_keeps_the_streams(
        tmp_path: Path) -> None:
    directory = tmp_path / "h"
    history.append(directory, _batch("s", 3), history.STREAM)
    old, new = {f"old-{b}" for b in range(4)}, {f"new-{b}" for b in range(5)}
    for tag, n in (("old", 4), ("new", 5)):
        history.append(tmp_path / tag, _batch(tag, n), history.BACKFILL)
    assert history.replace(directory, tmp_path / "old", history.BACKFILL) == 4 * ROWS_PER_BATCH
    stream = {f"s-{b}" for b in range(3)}
    views: list[set[str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                views.extend(_read_all_ways(directory))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(6):  # old -> new -> old ...: each replace one commit
            source = tmp_path / ("new" if i % 2 == 0 else "old")
            history.replace(directory, source, history.BACKFILL)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors[0]
    assert views and all(v in (stream | old, stream | new) for v in views), views[:3]
    assert _read_all_ways(directory)[0] == stream | old  # six replaces: back to the old rows

    # no rows to backfill: the origin is emptied, the stream's rows stay
    assert history.replace(directory, tmp_path / "nothing", history.BACKFILL) == 0
    assert all(v == stream for v in _read_all_ways(directory))


def _log(root: Path, users: list[str], per_user: int) -> None:
    """A transaction log (the simulator's layout) of `per_user` events for each user."""
    t0 = datetime.now(UTC) - timedelta(days=1)
    rows = [{"transaction_id": f"{u}-t{i}", "user_id": u, "merchant_id": f"m{i % 3}",
             "amount": 10.0 + i, "currency": "EUR", "channel": "online",
             "event_timestamp": t0 + timedelta(minutes=i)}
            for u in users for i in range(per_user)]
    day = root / "transactions" / f"date={t0:%Y-%m-%d}"
    shutil.rmtree(root / "transactions", ignore_errors=True)
    day.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows).cast(pa.schema([
        ("transaction_id", pa.string()), ("user_id", pa.string()), ("merchant_id", pa.string()),
        ("amount", pa.float64()), ("currency", pa.string()), ("channel", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC"))])), day / "part-0.parquet")


def test_a_backfill_rerun_replaces_its_rows_and_keeps_the_streams(tmp_path: Path) -> None:
    from streaming.backfill import backfill
    from streaming.velocity_sink import HistoryWriter

    root = tmp_path / "data"
    table = velocity_history_dir(root)
    _log(root, ["b1", "b2"], 5)
    assert backfill(root) == 10
    first = history.read(table).slice(0, 1).drop_columns([history.ORIGIN])
    HistoryWriter(table, history.STREAM).write(
        [first.set_column(0, "user_id", pa.array(["s1"]))])  # a row the live stream wrote
    _log(root, ["b3"], 4)  # the log changed: the backfill's rows are now b3's only
    killed, running = (table.parent / f".{table.name}-backfill-{n}" for n in ("killed", "running"))
    killed.mkdir()  # a staging table a SIGKILLed run left two days ago, and one being written
    os.utime(killed, (time.time() - 2 * 86_400,) * 2)
    running.mkdir()
    assert backfill(root) == 4
    rows = history.read(table, ["user_id", history.ORIGIN]).to_pylist()
    assert sorted((r["user_id"], r[history.ORIGIN]) for r in rows) == [
        *[("b3", history.BACKFILL)] * 4, ("s1", history.STREAM)]
    # its own staging table is gone, and the killed run's
    assert list(table.parent.glob(".*backfill*")) == [running]


def test_bad_input_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    directory = tmp_path / "h"
    history.append(directory, _batch("s", 1), history.STREAM)
    version = DeltaTable(str(directory)).version()
    with pytest.raises(ValueError, match="origin"):
        history.append(directory, _batch("x", 1), "stream' OR '1'='1")
    with pytest.raises(Exception, match="(?i)schema"):
        history.append(directory, pa.table({"other": [1]}), history.STREAM)
    assert DeltaTable(str(directory)).version() == version
    assert _read_all_ways(directory)[0] == {"s-0"}


def test_live_files_are_paths_on_disk_whatever_the_directory_name(tmp_path: Path) -> None:
    directory = tmp_path / "data dir é" / "h"  # (a literal % breaks delta-rs itself)
    history.append(directory, pa.table({"a": [1]}), history.STREAM)
    files = history.live_files(directory)
    assert len(files) == 1 and files[0].is_file() and directory in files[0].parents


def test_live_files_of_a_plain_parquet_directory_lists_it(tmp_path: Path) -> None:
    (tmp_path / "d" / "x").mkdir(parents=True)
    pq.write_table(pa.table({"a": [1]}), tmp_path / "d" / "x" / "1.parquet")
    assert history.live_files(tmp_path / "d") == [tmp_path / "d" / "x" / "1.parquet"]
    assert history.read(tmp_path / "nothing").num_rows == 0
    # a history of plain files from before the Delta table: a clear error, never shadowed
    with pytest.raises(RuntimeError, match="make backfill"):
        history.append(tmp_path / "d" / "x", pa.table({"a": [2]}), history.STREAM)
    with pytest.raises(RuntimeError, match="no Delta table"):
        history.read(tmp_path / "d" / "x")
    assert not history.is_table(tmp_path / "d" / "x")


def test_a_staged_file_dictionary_encodes_only_its_strings_and_reads_back_the_same_rows(
        tmp_path: Path) -> None:
    """Strings and lists of strings dictionary-encoded, times and amounts plain (a dictionary
    of nearly unique values is built and then abandoned, issue 20); the rows read back equal
    the rows written, through the table."""
    schema = pa.schema([("user_id", pa.string()), ("ts", pa.timestamp("us", tz="UTC")),
                        ("amounts", pa.list_(pa.float64())), ("merchants", pa.list_(pa.string()))])
    rows = pa.table({
        "user_id": [f"u{i % 7}" for i in range(500)],
        "ts": pa.array([1_765_000_000_000_000 + 7 * i for i in range(500)],
                       pa.timestamp("us", tz="UTC")),
        "amounts": [[i + 0.25, i / 3] for i in range(500)],
        "merchants": [[f"m{i % 5}", f"m{i % 3}"] for i in range(500)],
    }, schema=schema)
    directory = tmp_path / "h"
    staged = history.StagedFile(directory, schema, history.STREAM)
    staged.write(rows.slice(0, 200))
    staged.write(rows.slice(200))
    history.commit_staged(directory, [staged.close()])
    meta = pq.ParquetFile(staged.path).metadata
    for g in range(meta.num_row_groups):
        encodings = {meta.row_group(g).column(c).path_in_schema:
                     meta.row_group(g).column(c).encodings for c in range(meta.num_columns)}
        assert "RLE_DICTIONARY" in encodings["user_id"]
        assert "RLE_DICTIONARY" in encodings["merchants.list.element"]
        assert "RLE_DICTIONARY" not in encodings["ts"]
        assert "RLE_DICTIONARY" not in encodings["amounts.list.element"]
    back = history.read(directory).drop_columns([history.ORIGIN])
    assert back.sort_by("ts").equals(rows)
