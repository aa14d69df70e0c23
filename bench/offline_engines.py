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

Then the scaling curve of the engine whose retrieval was faster (`bench.engine_scaling`):
the same retrieval at 1M, 3M and 10M rows (`Sizes.engine_scaling_rows`), time and memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
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
from bench.engine_scaling import engine_up, run_curve
from bench.procs import BenchError, PeakTree, python, run_json
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
        ok = [e for e in ENGINES if "error" not in runs[e]]
        for e in set(ENGINES) - set(ok):
            section.notes.append(f"{e} failed: {runs[e]['error']}")
        same_frame = same_scores = None
        if len(ok) == len(ENGINES):
            same_frame = _same_frames(Path(runs["spark"]["frame"]),
                                      Path(runs["duckdb"]["frame"]))
            same_scores = _same_scores(Path(runs["spark"]["scores"]),
                                       Path(runs["duckdb"]["scores"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not ok:
        raise BenchError("both engines failed: " + "; ".join(runs[e]["error"] for e in ENGINES))
    spark, duck = runs["spark"], runs["duckdb"]
    section.details.update(identical_frames=same_frame, identical_scores=same_scores)

    def rate(r: dict[str, Any]) -> float | None:
        return n / r["retrieval_s"] if "retrieval_s" in r else None

    section.measures += [
        Measure("engine start-up (Spark session and JVM)", "s", spark.get("start_s"), None,
                "lower", stock_missing="none: DuckDB runs in the process"),
        Measure(f"retrieval: training frame of {n:,} rows", "s", spark.get("retrieval_s"),
                duck.get("retrieval_s"), "lower", note=f"frames identical: {same_frame}"),
        Measure(f"retrieval rows/s at {n:,} rows", "/s", rate(spark), rate(duck), "higher"),
        Measure(f"batch scoring of {batch_rows:,} rows", "s", spark.get("batch_s"),
                duck.get("batch_s"), "lower", note=f"scores identical: {same_scores}"),
        Measure("peak RSS, process tree (JVM included)", "MiB", spark.get("peak_tree_mib"),
                duck.get("peak_tree_mib"), "lower"),
    ]
    faster = min(ok, key=lambda e: float(runs[e]["retrieval_s"]))
    run_curve(dataset, faster, sizes, section)


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

def child_main(a: argparse.Namespace) -> dict[str, Any]:
    from training import batch_score
    from training.retrieval import labelled_entity_frame, open_store

    peak = PeakTree()
    start_s = engine_up(a.engine)
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
