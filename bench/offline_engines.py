"""The offline tier on each engine, side by side: `OFFLINE_ENGINE=spark` vs `duckdb`.

For each engine a child process (`python -m bench.offline_engines run --engine E ...`, with
`OFFLINE_ENGINE=E`) on the same data set, entity rows and model:

1. starts the engine (Spark: the local[2] session, JVM included; DuckDB: nothing), timed apart;
2. retrieval: `get_historical_features(...).to_df()` of N labelled transactions through the
   model's feature service (what training calls), timed;
3. batch scoring: `training.batch_score.run` over the newest days up to the batch size, timed.

Peak memory is the process tree's (the Spark JVM is a child of the Python process), sampled
every 0.1 s from /proc.  The parent then checks that both engines returned the same frame
cell for cell and wrote the same scores.  In the table "ours" is Spark and "stock" DuckDB
(the default), so a ratio says what moving to Spark costs or gains on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

from bench.batch_score import _days, _last_days
from bench.config import Sizes, get_settings, scratch_dir
from bench.data import (
    Dataset,
    newest_model,
    retrieval_dataset,
    scoring_dataset,
    with_loadable_model,
)
from bench.procs import BenchError, python, run_json
from bench.report import Measure, Section

ENGINES = ("spark", "duckdb")  # ours, stock columns of the table


# --- parent --------------------------------------------------------------------------------

def run(sizes: Sizes, section: Section) -> None:
    dataset = retrieval_dataset(min(sizes.retrieval_rows, 1_000_000))
    n = min(sizes.retrieval_rows, dataset.labelled)
    model_ds = dataset if newest_model(dataset.model_dir) else scoring_dataset()
    model_ds, note = with_loadable_model(model_ds)
    if note:
        section.notes.append(note)
    model = newest_model(model_ds.model_dir)
    start, end, batch_rows = _last_days(_days(dataset.root),
                                        min(sizes.batch_rows, sizes.retrieval_rows))
    section.ours_label = "OFFLINE_ENGINE=spark (Spark local[2], feature_repo.offline_engines)"
    section.stock_label = "OFFLINE_ENGINE=duckdb (the default)"
    section.notes.append(f"Data: {dataset.describe()}; model {model}; retrieval of {n:,} "
                         f"labelled transactions; batch scoring of {batch_rows:,} transactions "
                         f"({start} to {end}, end exclusive).")
    scratch = scratch_dir("engines-")
    try:
        runs = {e: _child(dataset, e, n, start, end, model, scratch / e) for e in ENGINES}
        section.details = {"runs": runs}
        for e, r in runs.items():
            if "error" in r:
                raise BenchError(f"{e} failed: {r['error']}")
        same_frame = _same_frames(Path(runs["spark"]["frame"]), Path(runs["duckdb"]["frame"]))
        same_scores = _same_scores(Path(runs["spark"]["scores"]),
                                   Path(runs["duckdb"]["scores"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    spark, duck = runs["spark"], runs["duckdb"]
    section.details.update(identical_frames=same_frame, identical_scores=same_scores)
    section.measures += [
        Measure("engine start-up (Spark session and JVM)", "s", spark["start_s"], None, "lower",
                stock_missing="none: DuckDB runs in the process"),
        Measure(f"retrieval: training frame of {n:,} rows", "s", spark["retrieval_s"],
                duck["retrieval_s"], "lower", note=f"frames identical: {same_frame}"),
        Measure(f"retrieval rows/s at {n:,} rows", "/s", n / spark["retrieval_s"],
                n / duck["retrieval_s"], "higher"),
        Measure(f"batch scoring of {batch_rows:,} rows", "s", spark["batch_s"], duck["batch_s"],
                "lower", note=f"scores identical: {same_scores}"),
        Measure("peak RSS, process tree (JVM included)", "MiB", spark["peak_tree_mib"],
                duck["peak_tree_mib"], "lower"),
    ]


def _child(dataset: Dataset, engine: str, rows: int, start: date, end: date,
           model: Path | None, out: Path) -> dict[str, Any]:
    argv = python("-m", "bench.offline_engines", "run", "--engine", engine, "--rows", str(rows),
                  "--start", start.isoformat(), "--end", end.isoformat(), "--out", str(out))
    if model is not None:
        argv += ["--model", str(model)]
    log = get_settings().run_dir / "logs" / f"offline-engines-{engine}.log"
    try:
        return run_json(f"offline engine {engine}", argv, dataset.env(OFFLINE_ENGINE=engine),
                        log, 3600)
    except BenchError as exc:
        return {"engine": engine, "error": str(exc).splitlines()[0]}


def _same_frames(a: Path, b: Path) -> bool:
    """Cell for cell (NaN equals NaN; array cells compared as lists).  Columns are matched by
    name: the order of a view's raw columns in `to_df()` follows Feast's set iteration, which
    differs between processes (string hashing), whatever the engine."""
    import numpy as np
    import pandas as pd

    def read(path: Path) -> pd.DataFrame:
        df = pd.read_parquet(path)
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = df[c].map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
        return df

    x, y = read(a), read(b)
    if set(x.columns) != set(y.columns):
        return False
    try:
        pd.testing.assert_frame_equal(x, y[x.columns], check_exact=True)
    except AssertionError:
        return False
    return True


def _same_scores(a: Path, b: Path) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def read(root: Path) -> pa.Table:
        files = sorted(root.glob("date=*/*.parquet"))
        return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("transaction_id")

    return bool(read(a).equals(read(b)))


# --- child ---------------------------------------------------------------------------------

def _tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (KiB), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")),
                              0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total


class _PeakTree:
    """Samples the process tree's RSS every 0.1 s in a daemon thread; `peak_mib` is the max."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_kib = max(self.peak_kib, _tree_rss_kib(os.getpid()))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _tree_rss_kib(os.getpid()))
        return self.peak_kib / 1024


def child_main(a: argparse.Namespace) -> dict[str, Any]:
    from feature_repo.config import apply_env_defaults
    from feature_repo.offline_engines import get_settings as engine_settings
    from training import batch_score
    from training.retrieval import labelled_entity_frame, open_store

    apply_env_defaults()
    if engine_settings().engine != a.engine:
        raise SystemExit(f"OFFLINE_ENGINE is {engine_settings().engine}, not {a.engine}")
    peak = _PeakTree()
    t0 = time.perf_counter()
    if a.engine == "spark":
        from feature_repo.offline_engines.spark import spark_session

        spark_session()
    start_s = time.perf_counter() - t0
    store = open_store()
    entities = labelled_entity_frame()
    if a.rows < len(entities):
        entities = entities.sample(a.rows, random_state=7).reset_index(drop=True)
    service = store.get_feature_service("fraud_model_v1")
    t0 = time.perf_counter()
    df = store.get_historical_features(entity_df=entities, features=service).to_df()
    retrieval_s = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    frame = a.out / "frame.parquet"
    df.to_parquet(frame)
    del df
    t0 = time.perf_counter()
    batch_score.run(a.out / "scores", a.start, a.end, chunk_rows=200_000, model_path=a.model,
                    progress=False)
    batch_s = time.perf_counter() - t0
    return {"engine": a.engine, "rows": len(entities), "start_s": start_s,
            "retrieval_s": retrieval_s, "batch_s": batch_s, "peak_tree_mib": peak.stop(),
            "frame": str(frame), "scores": str(a.out / "scores")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.offline_engines")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one engine's timed runs (child process of the benchmark)")
    r.add_argument("--engine", choices=ENGINES, required=True)
    r.add_argument("--rows", type=int, required=True)
    r.add_argument("--start", type=date.fromisoformat, required=True)
    r.add_argument("--end", type=date.fromisoformat, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--model", type=Path, default=None)
    print(json.dumps(child_main(p.parse_args(argv)), default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
