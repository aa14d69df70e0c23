"""Training retrieval on one offline engine at growing sizes: the scaling curve.

`run_curve` runs, for each of `Sizes.engine_scaling_rows` (full: 1M, 3M, 10M), a child process
(`python -m bench.engine_scaling --engine E --rows N --max-rss-mib M`, with `OFFLINE_ENGINE=E`)
that builds N entity rows and times `get_historical_features` through the model's feature
service in its two steps (`to_df()` is `to_arrow().to_pandas()` in our store): the join and the
on-demand views into Arrow, then the conversion to pandas, skipped when it would not fit.

Above the labelled transactions the log holds, the entity rows are the labelled ones again at
earlier times (`repeated_entity_rows`): same log, same feature tables, only the entity frame
grows.  Per point: both times, rows/s into Arrow, the process tree's RSS just before the call
and its peak through `to_arrow` (entity frame included).  A child over its memory cap (what was
available at its start, less `HEADROOM_MIB`) is killed, so a size this machine cannot hold
fails alone.  A plot goes to `reports/`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from bench.config import Sizes, get_settings
from bench.data import Dataset
from bench.procs import BenchError, PeakTree, python, run_json, tree_rss_kib
from bench.report import Measure, Section
from feature_repo.config import apply_env_defaults
from feature_repo.offline_engines import ENGINES
from feature_repo.offline_engines import get_settings as engine_settings

SHIFT = timedelta(hours=1)  # copy k of an entity row asks for its features k hours earlier
PANDAS_PER_ARROW_BYTE = 2.5  # to_pandas() of the frame took ~1.9x its Arrow bytes at 1M rows
HEADROOM_MIB = 3072  # a child's cap: the memory available at its start less this


# --- parent --------------------------------------------------------------------------------

def run_curve(dataset: Dataset, engine: str, sizes: Sizes, section: Section) -> None:
    """Retrieval on `engine` at each size, one child each; measures, notes and a plot."""
    points: list[dict[str, Any]] = []
    for rows in sizes.engine_scaling_rows:
        cap = psutil.virtual_memory().available / 2**20 - HEADROOM_MIB
        argv = python("-m", "bench.engine_scaling", "--engine", engine, "--rows", str(rows),
                      "--max-rss-mib", f"{cap:.0f}")
        log = get_settings().run_dir / "logs" / f"engine-scaling-{engine}.log"
        try:
            points.append({**run_json(f"{engine} retrieval of {rows:,} rows", argv,
                                      dataset.env(OFFLINE_ENGINE=engine), log, 3600),
                           "cap_mib": cap})
        except BenchError as exc:
            section.notes.append(f"Scaling on {engine}: {rows:,} rows failed "
                                 f"({str(exc).splitlines()[0]}; cap {cap:,.0f} MiB); larger "
                                 "sizes not run.")
            break
    section.details["scaling"] = {"engine": engine, "points": points}
    if not points:
        return
    for p in points:
        section.measures += _point_measures(engine, p)
    base, last = points[0], points[-1]
    if len(points) > 1:
        scale = f"{base['rows']:,} -> {last['rows']:,} rows ({last['rows'] / base['rows']:.0f}x)"
        section.measures += [
            Measure(f"{engine} scaling {scale}: time ratio (to Arrow)", "x",
                    last["arrow_s"] / base["arrow_s"], None, "lower", stock_missing="-"),
            Measure(f"{engine} scaling {scale}: peak RSS ratio (through to_arrow)", "x",
                    last["peak_arrow_mib"] / base["peak_arrow_mib"], None, "lower",
                    stock_missing="-"),
        ]
    png = get_settings().reports_dir / (
        "engine-scaling.png" if sizes.label == "full" else f"engine-scaling-{sizes.label}.png")
    plot(engine, points, png)
    section.details["scaling"]["plot"] = str(png)
    section.notes.append(
        f"Scaling curve on {engine} (bench.engine_scaling): each size in its own process, "
        f"killed if its tree passes the cap (available memory at its start less {HEADROOM_MIB} "
        f"MiB); entity rows beyond the {base['labelled']:,} labelled transactions are the "
        f"labelled ones again, copy k asking for features {SHIFT.total_seconds() / 3600:g} h x "
        f"k earlier (same log and feature tables, only the entity frame grows). Plot: {png}.")


def _point_measures(engine: str, p: dict[str, Any]) -> list[Measure]:
    tag = f"{engine} scaling, {p['rows']:,} rows"
    copies = (f"a sample of the {p['labelled']:,} labelled" if p["copies"] == 1 else
              f"{p['rows'] / p['labelled']:.2f}x the {p['labelled']:,} labelled (copies at "
              "earlier times)")
    skipped = (f"to_pandas skipped: the process at {p['rss_arrow_mib']:,.0f} MiB plus "
               f"{PANDAS_PER_ARROW_BYTE}x the {p['table_mib']:,.0f} MiB table would pass the "
               f"cap of {p['cap_mib']:,.0f} MiB")
    return [
        Measure(f"{tag}: retrieval to Arrow (join, on-demand views)", "s", p["arrow_s"], None,
                "lower", stock_missing="-",
                note=f"entity rows: {copies}; rows out "
                     f"{p['rows_out']:,}; Arrow table {p['table_mib']:,.0f} MiB"),
        Measure(f"{tag}: rows/s to Arrow", "/s", p["rows"] / p["arrow_s"], None, "higher",
                stock_missing="-"),
        Measure(f"{tag}: to_df() (to Arrow + to_pandas)", "s", p["to_df_s"], None, "lower",
                stock_missing="-", note="" if p["to_df_s"] is not None else skipped),
        Measure(f"{tag}: peak RSS through to_arrow, process tree", "MiB", p["peak_arrow_mib"],
                None, "lower", stock_missing="-",
                note=f"{p['rss_before_mib']:,.0f} MiB just before the call (entity frame "
                     f"built); peak of the whole process {p['peak_tree_mib']:,.0f} MiB"),
    ]


def plot(engine: str, points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [p["rows"] for p in points]
    done = [p for p in points if p["to_df_s"] is not None]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(rows, [p["arrow_s"] for p in points], marker="o", label="to_arrow()")
    a1.plot([p["rows"] for p in done], [p["to_df_s"] for p in done], marker="s",
            label="to_df()")
    a1.set_ylabel("get_historical_features(...) (s)")
    a2.plot(rows, [p["peak_arrow_mib"] for p in points], marker="o",
            label="peak through to_arrow")
    a2.plot(rows, [p["rss_before_mib"] for p in points], marker="o", label="before the call")
    a2.set_ylabel("RSS, process tree (MiB)")
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xticks(rows, [f"{r / 1e6:g}M" for r in rows])
        a.xaxis.set_minor_formatter(NullFormatter())
        for set_formatter in (a.yaxis.set_major_formatter, a.yaxis.set_minor_formatter):
            set_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:.2g}"))
        a.set_xlabel("entity rows")
        a.legend()
    fig.suptitle(f"training retrieval on {engine}: time and memory vs entity rows")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- child ---------------------------------------------------------------------------------

def repeated_entity_rows(entities: pd.DataFrame, rows: int) -> pd.DataFrame:
    """`rows` entity rows made from the labelled ones.

    Up to their number, a seeded sample.  Beyond it, whole copies, then a seeded sample of one
    more copy for the rest: copy k (k >= 1) is each transaction again with `transaction_id`
    suffixed `~k` and its event time and `request_ts_us` k x SHIFT earlier (the same
    transaction asked about at an earlier time: a valid point-in-time query on the same log).
    """
    if rows <= len(entities):
        return entities.sample(rows, random_state=7).reset_index(drop=True)
    whole, rest = divmod(rows, len(entities))
    parts = [_shifted(entities, k) for k in range(whole)]
    if rest:
        parts.append(_shifted(entities, whole).sample(rest, random_state=7))
    return pd.concat(parts, ignore_index=True)


def _shifted(entities: pd.DataFrame, k: int) -> pd.DataFrame:
    if k == 0:
        return entities
    out = entities.copy()
    out["transaction_id"] = out["transaction_id"] + f"~{k}"
    out["event_timestamp"] = out["event_timestamp"] - k * SHIFT
    out["request_ts_us"] = out["request_ts_us"] - k * int(SHIFT.total_seconds() * 1_000_000)
    return out


def engine_up(engine: str) -> float:
    """Check `OFFLINE_ENGINE` is `engine` and start it; seconds it took (Spark's session)."""
    apply_env_defaults()
    if engine_settings().engine != engine:
        raise SystemExit(f"OFFLINE_ENGINE is {engine_settings().engine}, not {engine}")
    t0 = time.perf_counter()
    if engine == "spark":  # pyspark loads only where Spark is asked for
        from feature_repo.offline_engines.spark import spark_session

        spark_session()
    return time.perf_counter() - t0


def point(engine: str, rows: int, max_rss_mib: float | None) -> dict[str, Any]:
    """One point of the curve, in this process (see the module docstring)."""
    # child only: the harness imports this module too and need not load Feast to run the curve
    from training.retrieval import labelled_entity_frame, open_store

    peak = PeakTree(max_rss_mib)
    start_s = engine_up(engine)
    store = open_store()
    labelled = labelled_entity_frame()
    entities = repeated_entity_rows(labelled, rows)
    n_labelled = len(labelled)
    del labelled
    service = store.get_feature_service("fraud_model_v1")
    rss_before = tree_rss_kib(os.getpid()) / 1024
    t0 = time.perf_counter()
    table = store.get_historical_features(entity_df=entities, features=service).to_arrow()
    arrow_s = time.perf_counter() - t0
    rss_arrow = tree_rss_kib(os.getpid()) / 1024
    table_mib = table.nbytes / 2**20
    result: dict[str, Any] = {
        "engine": engine, "rows": len(entities), "labelled": n_labelled,
        "copies": -(-len(entities) // n_labelled), "start_s": start_s,
        "rows_out": table.num_rows, "rss_before_mib": rss_before, "arrow_s": arrow_s,
        "rss_arrow_mib": rss_arrow, "peak_arrow_mib": max(peak.peak_kib / 1024, rss_arrow),
        "table_mib": table_mib,
        "pandas_s": None, "to_df_s": None}
    if max_rss_mib is None or rss_arrow + PANDAS_PER_ARROW_BYTE * table_mib < max_rss_mib:
        t0 = time.perf_counter()
        df = table.to_pandas()
        result["pandas_s"] = time.perf_counter() - t0
        result["to_df_s"] = arrow_s + result["pandas_s"]
        del df
    return {**result, "peak_tree_mib": peak.stop()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.engine_scaling",
                                description="one point of the scaling curve (a child process)")
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--max-rss-mib", type=float, default=None,
                   help="kill this process when its tree's RSS passes this")
    a = p.parse_args(argv)
    print(json.dumps(point(a.engine, a.rows, a.max_rss_mib), default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
