"""Batch scoring: `python -m training.batch_score` over the biggest data set at hand.

*Ours*: `training.batch_score` (consecutive days grouped up to `--chunk-rows`, point-in-time
features through the repo's ASOF offline store, the served model, parquet out), run as its CLI
in a child process; timed end to end, peak RSS from the kernel (`ru_maxrss`).  It runs twice,
on the last quarter of the days and on all of them, so the report shows whether peak memory
grows with the input (it should not: it is bounded by one group of days plus a chunk).  10M rows are not simulated here; the time
for 10M is *extrapolated* linearly from the measured rate and labelled as such.
*Stock*: the same transactions scored the plain way with Feast's own DuckDB offline store (one
`get_historical_features` call for the whole sample, then the same model), on a sample small
enough to finish within the retrieval budget.

If `training.batch_score` is not importable the section reports "not available".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from bench.config import Sizes, get_settings, scratch_dir
from bench.data import (
    Dataset,
    newest_model,
    retrieval_dataset,
    scoring_dataset,
    with_loadable_model,
)
from bench.procs import BenchError, python, run_json
from bench.report import Measure, Section, Target

TARGET_ROWS = 10_000_000
TARGET_S = 600.0


def _days(root: Path) -> list[tuple[date, int]]:
    """(day, rows) of the day-partitioned log, oldest first."""
    import pyarrow.parquet as pq

    from feature_repo.paths import transactions_dir

    out = []
    for d in sorted((transactions_dir(root)).glob("date=*")):
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in d.glob("*.parquet"))
        out.append((date.fromisoformat(d.name.split("=", 1)[1]), rows))
    return out


def _last_days(days: list[tuple[date, int]], rows: int) -> tuple[date, date, int]:
    """[start, end) covering the newest days up to about `rows` transactions."""
    total, start = 0, days[-1][0]
    for day, n in reversed(days):
        if total >= rows:
            break
        total += n
        start = day
    return start, days[-1][0] + timedelta(days=1), total


def run(sizes: Sizes, section: Section) -> None:
    if importlib.util.find_spec("training.batch_score") is None:
        raise BenchError("not available: training.batch_score does not exist in this checkout")
    dataset = retrieval_dataset(min(sizes.retrieval_rows, 1_000_000))
    # A prepared data set has no model of its own: the scoring data's model (same feature
    # service, same definitions) scores it, as the served model would.
    model_ds = dataset if newest_model(dataset.model_dir) else scoring_dataset()
    model_ds, note = with_loadable_model(model_ds)
    if note:
        section.notes.append(note)
    model = newest_model(model_ds.model_dir)
    days = _days(dataset.root)
    section.ours_label = ("python -m training.batch_score (ASOF offline store, days grouped "
                          "into chunks, written per day)")
    section.stock_label = ("one get_historical_features call with Feast's DuckDB offline store "
                           "+ the same model")
    section.notes.append(f"Data: {dataset.describe()}; model {model}.")
    scratch = scratch_dir("batch-")
    try:
        runs = {}
        biggest = min(sizes.batch_rows, sum(n for _, n in days))  # the most we have
        for label, rows in (("quarter", biggest // 4), ("full", biggest)):
            start, end, expect = _last_days(days, rows)
            runs[label] = _child(dataset, "ours", start, end, model, scratch / label, timeout_s=3600)
            runs[label]["expected_rows"] = expect
        stock_rows = sizes.retrieval_stock_first
        start, end, expect = _last_days(days, stock_rows)
        stock = _child(dataset, "stock", start, end, model, scratch / "stock",
                       timeout_s=sizes.retrieval_stock_budget_s + 120)
        ours_same = _child(dataset, "ours", start, end, model, scratch / "ours-same",
                           timeout_s=1200)
        section.details = {"ours": runs, "stock": stock, "ours_same_rows": ours_same}
        _measures(section, runs, stock, ours_same)
        if section.missed():
            start, end, _ = _last_days(days, biggest // 4)
            prof = _child(dataset, "ours", start, end, model, scratch / "profile",
                          timeout_s=3600, profile=True)
            section.profiles["ours, the quarter-size run again (cProfile)"] = prof.get(
                "profile", prof.get("error", ""))
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def _child(dataset: Dataset, kind: str, start: date, end: date, model: Path | None, out: Path,
           timeout_s: float, profile: bool = False) -> dict[str, Any]:
    argv = python("-m", "bench.batch_score", kind, "--start", start.isoformat(), "--end",
                  end.isoformat(), "--out", str(out), *(["--profile"] if profile else []))
    if model is not None:
        argv += ["--model", str(model)]
    log = get_settings().run_dir / "logs" / f"batch-{kind}.log"
    t0 = time.perf_counter()
    try:
        return run_json(f"batch score {kind}", argv, dataset.env(), log, timeout_s)
    except BenchError as exc:
        return {"error": str(exc).splitlines()[0], "gave_up_after_s": time.perf_counter() - t0,
                "stack_when_killed": exc.detail}


def _measures(section: Section, runs: dict[str, dict[str, Any]], stock: dict[str, Any],
              ours_same: dict[str, Any]) -> None:
    full = runs["full"]
    if "error" in full:
        raise BenchError(f"training.batch_score failed: {full['error']}")
    rate = full["rows"] / full["seconds"]
    extrapolated = TARGET_ROWS / rate
    stock_rate = None if "error" in stock else stock["rows"] / stock["seconds"]
    same_rate = None if "error" in ours_same else ours_same["rows"] / ours_same["seconds"]
    section.measures += [
        Measure(f"rows/s, ours on {full['rows']:,} rows vs stock on {stock.get('rows', 0):,}",
                "/s", rate, stock_rate, "higher"),
        Measure(f"rows/s on the same {stock.get('rows', 0):,} rows", "/s", same_rate, stock_rate,
                "higher"),
        Measure(f"EXTRAPOLATED seconds for {TARGET_ROWS:,} rows (linear from the measured "
                "rate)", "s", extrapolated,
                None if stock_rate is None else TARGET_ROWS / stock_rate, "lower",
                Target("<=", TARGET_S),
                note=f"not measured: {TARGET_ROWS:,} rows / measured rows per second"),
        Measure(f"peak RSS on the same {stock.get('rows', 0):,} rows", "MiB",
                ours_same.get("peak_rss_mib"), stock.get("peak_rss_mib"), "lower"),
    ]
    quarter = runs["quarter"]
    if "error" not in quarter:
        section.notes.append(
            f"Bounded memory (ours): peak RSS {quarter['peak_rss_mib']:,.0f} MiB for "
            f"{quarter['rows']:,} rows vs {full['peak_rss_mib']:,.0f} MiB for {full['rows']:,} "
            f"rows ({full['rows'] / max(quarter['rows'], 1):.1f}x the rows). Output rows: "
            f"{full['rows_out']:,} of {full['rows']:,}.")
    if "error" in stock:
        section.notes.append(f"Stock did not complete: {stock['error']}")


# --- children ------------------------------------------------------------------------------

def _rows(root: Path, start: date, end: date) -> int:
    return sum(n for d, n in _days(root) if start <= d < end)


def ours_main(a: argparse.Namespace) -> dict[str, Any]:
    """The project's CLI, as an operator runs it."""
    from feature_repo.config import data_dir
    from training import batch_score

    argv = ["--start", a.start.isoformat(), "--end", a.end.isoformat(), "--out", str(a.out)]
    if a.model:
        argv += ["--model", str(a.model)]
    t0 = time.perf_counter()
    batch_score.main(argv)
    seconds = time.perf_counter() - t0
    return {"rows": _rows(data_dir(), a.start, a.end), "seconds": seconds,
            "rows_out": _output_rows(a.out)}


def stock_main(a: argparse.Namespace) -> dict[str, Any]:
    """Feast's DuckDB offline store, one call for the whole range, then the same model."""
    import numpy as np
    import pandas as pd

    from bench.retrieval import open_store
    from scoring.artifact import load_artifact
    from training.retrieval import entity_frame, read_transactions

    if a.model is None:
        raise SystemExit("stock batch scoring needs --model")
    t0 = time.perf_counter()
    start = pd.Timestamp(a.start, tz="UTC").to_pydatetime()
    end = pd.Timestamp(a.end, tz="UTC").to_pydatetime()
    tx = read_transactions(None, start, end)
    artifact = load_artifact(a.model)
    store = open_store("duckdb")
    service = store.get_feature_service(artifact.feature_service)
    frame = store.get_historical_features(entity_df=entity_frame(tx), features=service).to_df()
    x = frame[artifact.features].to_numpy(dtype="float64", na_value=np.nan)
    scores = artifact.model.predict_proba(x)[:, 1]
    a.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"transaction_id": frame["transaction_id"], "score": scores}).to_parquet(
        a.out / "scores.parquet")
    return {"rows": len(tx), "seconds": time.perf_counter() - t0, "rows_out": len(frame)}


def _output_rows(out: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("date=*/*.parquet"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.batch_score")
    p.add_argument("kind", choices=["ours", "stock"])
    p.add_argument("--start", type=date.fromisoformat, required=True)
    p.add_argument("--end", type=date.fromisoformat, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--profile", action="store_true", help="cProfile the run")
    a = p.parse_args(argv)
    import cProfile

    # Import what both paths use before any clock starts: a one-off cost of the process, not
    # of scoring (Feast's imports alone take seconds).
    import feast  # noqa: F401

    import scoring.loader  # noqa: F401
    import training.batch_score  # noqa: F401
    import training.retrieval  # noqa: F401

    prof = cProfile.Profile() if a.profile else None
    if prof:
        prof.enable()
    result = ours_main(a) if a.kind == "ours" else stock_main(a)
    if prof:
        from bench.profile import cprofile_summary

        prof.disable()
        result["profile"] = cprofile_summary(prof)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
