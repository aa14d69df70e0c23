"""Training/serving skew audit: do the features served online equal what training would see?

`python -m training.skew_audit [--log-dir DIR] [--threshold 0.01] [--since T] [--until T]`

Replays every request in the scorer's prediction log (scoring/prediction_log.py) through
Feast's `get_historical_features` at the request's own timestamp, with the feature service the
request was scored with (entity rows from `training.retrieval.entity_frame`, so request data
goes through the same on-demand transformations), and compares each model input:

* **exact**: equal, or missing on both sides (`--rtol` relaxes "equal" for floats);
* **stale**: a side's row was discarded by the TTL, or the online row is older than the row
  the point-in-time join picks (materialization or the stream lagging);
* **missing**: one side had no row at all for the entity;
* **value_differs**: both sides read a row, the online one the same as or newer than the
  offline one, and the values still differ (a write the offline history never saw, a
  corrupted row, or a transformation that differs).

Drift: the population stability index of the logged vectors against the training reference
saved with the model (`<model-dir>/<version>/reference.json`, see scoring/drift.py).

Prints a per-feature table, writes a JSON report (`--report`) and exits 1 when the worst
feature's mismatch rate exceeds `--threshold`, 2 when there is nothing to audit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
from feast import FeatureStore

from feature_repo.config import PROJECT_DIR
from feature_repo.history import live_files
from scoring.config import get_settings as serving_settings
from scoring.drift import PSI_MIN_SAMPLES, load_reference, psi_by_feature
from scoring.prediction_log import LOG_SCHEMA
from training.config import get_settings
from training.retrieval import entity_frame, open_store, training_frame

CAUSES = ("stale", "missing", "value_differs")
LARGEST = 5


def _utc(text: str) -> datetime:
    ts = pd.Timestamp(text)
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()


def read_log(log_dir: Path, since: datetime | None = None, until: datetime | None = None
             ) -> pd.DataFrame:
    """Logged requests with since <= event_timestamp < until, one per (transaction, service).

    A transaction scored twice keeps its latest record.
    """
    files = [p for p in sorted(log_dir.glob("date=*/part-*.parquet"))
             if since is None or p.parent.name[5:] >= since.date().isoformat()]
    if not files:
        return LOG_SCHEMA.empty_table().to_pandas()
    flt = None
    if since is not None:
        flt = ds.field("event_timestamp") >= pa.scalar(since, pa.timestamp("us", tz="UTC"))
    if until is not None:
        f2 = ds.field("event_timestamp") < pa.scalar(until, pa.timestamp("us", tz="UTC"))
        flt = f2 if flt is None else flt & f2
    log = ds.dataset([str(p) for p in files], format="parquet", schema=LOG_SCHEMA
                     ).to_table(filter=flt).to_pandas()
    log = log.sort_values("scored_at", kind="stable")
    log = log.drop_duplicates(["transaction_id", "feature_service"], keep="last")
    return log.sort_values(["event_timestamp", "transaction_id"]).reset_index(drop=True)


# --- where each model input comes from ---------------------------------------------------


@dataclass(frozen=True)
class View:
    name: str
    join_key: str
    features: list[str]
    ttl_us: int | None
    path: str
    timestamp_field: str


def source_views(store: FeatureStore, service: str) -> tuple[list[str], dict[str, list[View]]]:
    """The service's output names, and for each the stored views its value is read from."""
    names: list[str] = []
    sources: dict[str, list[View]] = {}
    views: dict[str, View] = {}

    def view(name: str) -> View:
        if name not in views:
            fv = store.get_feature_view(name)
            src = fv.batch_source
            views[name] = View(name, fv.join_keys[0], [f.name for f in fv.features],
                               int(fv.ttl.total_seconds() * 1e6) if fv.ttl else None,
                               str(src.path), src.timestamp_field)  # type: ignore[union-attr]
        return views[name]

    for proj in store.get_feature_service(service).feature_view_projections:
        try:
            odfv = store.get_on_demand_feature_view(proj.name)
        except Exception:  # noqa: BLE001 - not an on-demand view: a stored one
            odfv = None
        stored = ([view(p.name) for p in odfv.source_feature_view_projections.values()]
                  if odfv is not None else [view(proj.name)])
        for f in proj.features:
            names.append(f.name)
            sources[f.name] = stored
    return names, sources


def offline_row_times(view: View, keys: list[str], ts_us: list[int]) -> list[int | None]:
    """Per entity row: event time (epoch us) of the latest offline row at or before t, any age.
    A directory is read through `history.live_files`: a Delta table's committed files only
    (not a staged file still being written, nor one a compaction removed)."""
    path = Path(view.path)
    files = live_files(path) if path.is_dir() else [path]
    if not files:
        return [None] * len(keys)
    target = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("e", pa.table({"i": pa.array(range(len(keys)), pa.int64()),
                                    "k": pa.array(keys, pa.string()),
                                    "t": pa.array(ts_us, pa.int64())}))
        rows = con.execute(
            f'SELECT e.i, f.us FROM e ASOF LEFT JOIN (SELECT "{view.join_key}" AS k, '
            f'epoch_us("{view.timestamp_field}"::TIMESTAMPTZ) AS us '
            f"FROM read_parquet({target})) f ON e.k = f.k AND e.t >= f.us ORDER BY e.i"
        ).fetchall()
    finally:
        con.close()
    return [None if us is None else int(us) for _, us in rows]


# --- comparison ---------------------------------------------------------------------------


def _floats(values: Any) -> np.ndarray:
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        try:
            out[i] = np.nan if v is None or pd.isna(v) else float(v)
        except (TypeError, ValueError):
            out[i] = np.nan
    return out


def _online_row(ages: dict[str, float], view: View, t_us: int) -> int | None:
    for f in view.features:
        if ages.get(f) is not None:
            return t_us - round(ages[f] * 1e6)
    return None


def _cause(on_row: int | None, on_stale: bool, off_row: int | None, view: View, t_us: int
           ) -> str:
    off_used = off_row if off_row is not None and (
        view.ttl_us is None or off_row >= t_us - view.ttl_us) else None
    if on_row is None and off_used is None:
        return "value_differs"
    if on_row is None:
        return "stale" if on_stale else "missing"
    if off_used is None:
        return "stale" if off_row is not None else "missing"
    return "stale" if on_row < off_used - 1 else "value_differs"  # 1 us: timestamp rounding


def compare_group(store: FeatureStore, service: str, log: pd.DataFrame, rtol: float
                  ) -> dict[str, dict[str, Any]]:
    """Per feature of `service`: exact matches, mismatches by cause, largest differences."""
    names, sources = source_views(store, service)
    entities = entity_frame(log)
    offline = training_frame(store, service, entities)
    online = [json.loads(s) for s in log["features"]]
    ages = [json.loads(s) for s in log["feature_ages"]]
    stale = [set(s) for s in log["stale_features"]]
    t_us = entities["request_ts_us"].tolist()
    row_times: dict[tuple[str, int], int | None] = {}

    def off_row(view: View, idx: np.ndarray) -> None:
        todo = [int(i) for i in idx if (view.name, int(i)) not in row_times]
        if todo:
            keys = [str(log[view.join_key].iloc[i]) for i in todo]
            got = offline_row_times(view, keys, [t_us[i] for i in todo])
            row_times.update({(view.name, i): r for i, r in zip(todo, got, strict=True)})

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        a = _floats([v.get(name) for v in online])
        b = _floats(offline[name].tolist())
        same = np.isclose(a, b, rtol=rtol, atol=0.0, equal_nan=True)
        bad = np.flatnonzero(~same)
        causes: Counter[str] = Counter()
        worst: list[dict[str, Any]] = []
        for view in sources[name]:
            off_row(view, bad)
        for i in bad:
            cause = "value_differs"
            for view in sources[name]:
                c = _cause(_online_row(ages[i], view, t_us[i]),
                           any(f in stale[i] for f in view.features),
                           row_times[(view.name, int(i))], view, t_us[i])
                if c != "value_differs":
                    cause = c
                    break
            causes[cause] += 1
            diff = abs(a[i] - b[i])
            worst.append({"transaction_id": log["transaction_id"].iloc[i],
                          "user_id": log["user_id"].iloc[i],
                          "event_timestamp": log["event_timestamp"].iloc[i].isoformat(),
                          "online": None if np.isnan(a[i]) else float(a[i]),
                          "offline": None if np.isnan(b[i]) else float(b[i]),
                          "abs_diff": None if np.isnan(diff) else float(diff), "cause": cause})
        worst.sort(key=lambda w: -math.inf if w["abs_diff"] is None else w["abs_diff"],
                   reverse=True)
        out[name] = {"compared": len(a), "exact": int(same.sum()), "mismatches": len(bad),
                     "causes": {c: causes.get(c, 0) for c in CAUSES}, "largest": worst[:LARGEST]}
    return out


def _merge(into: dict[str, dict[str, Any]], part: dict[str, dict[str, Any]]) -> None:
    for name, r in part.items():
        if name not in into:
            into[name] = r
            continue
        acc = into[name]
        for k in ("compared", "exact", "mismatches"):
            acc[k] += r[k]
        for c in CAUSES:
            acc["causes"][c] += r["causes"][c]
        acc["largest"] = sorted(acc["largest"] + r["largest"], reverse=True,
                                key=lambda w: -math.inf if w["abs_diff"] is None else w["abs_diff"]
                                )[:LARGEST]


def drift(log: pd.DataFrame, model_dir: Path) -> tuple[str | None, int, dict[str, float]]:
    """PSI of the logged vectors of the most-logged model version against its reference:
    (version, vectors compared, PSI per feature)."""
    if log.empty:
        return None, 0, {}
    version = str(log["model_version"].value_counts().index[0])
    reference = load_reference(model_dir / version)
    if reference is None:
        return version, 0, {}
    vectors = [json.loads(s) for s in log.loc[log["model_version"] == version, "features"]]
    columns = {f: [v.get(f) for v in vectors] for f in reference["features"]}
    return version, len(vectors), psi_by_feature(reference, columns)


def audit(log: pd.DataFrame, store: FeatureStore, model_dir: Path, threshold: float,
          rtol: float = 0.0) -> dict[str, Any]:
    """The report (see the module docstring) for an already-read log."""
    features: dict[str, dict[str, Any]] = {}
    for service, group in log.groupby("feature_service", sort=True):
        _merge(features, compare_group(store, str(service), group.reset_index(drop=True), rtol))
    version, samples, psi = drift(log, model_dir)
    for name, r in features.items():
        r["mismatch_rate"] = r["mismatches"] / r["compared"] if r["compared"] else 0.0
        r["psi"] = psi.get(name)
    worst = max(features, key=lambda n: features[n]["mismatch_rate"], default=None)
    rate = features[worst]["mismatch_rate"] if worst else 0.0
    cells = sum(r["compared"] for r in features.values())
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "records": len(log),
        "feature_services": sorted(log["feature_service"].unique().tolist()),
        "model_versions": sorted(log["model_version"].unique().tolist()),
        "event_time_range": [log["event_timestamp"].min().isoformat(),
                             log["event_timestamp"].max().isoformat()] if len(log) else None,
        "threshold": threshold,
        "worst_feature": worst,
        "mismatch_rate": rate,  # of the worst feature: what the exit code is decided on
        "cell_mismatch_rate": sum(r["mismatches"] for r in features.values()) / cells
        if cells else 0.0,
        "passed": rate <= threshold,
        "drift_reference_version": version if psi else None,
        "psi_samples": samples,
        "features": features,
    }


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'feature':<30} {'compared':>8} {'exact':>7} {'stale':>6} {'missing':>7} "
            f"{'differs':>7} {'mismatch':>8} {'max |diff|':>11} {'PSI':>7}")
    lines = [head, "-" * len(head)]
    few = "*" if report["psi_samples"] < PSI_MIN_SAMPLES else ""
    for name, r in report["features"].items():
        c = r["causes"]
        diffs = [w["abs_diff"] for w in r["largest"] if w["abs_diff"] is not None]
        psi = "" if r["psi"] is None else f"{r['psi']:.3f}{few}"
        lines.append(
            f"{name:<30} {r['compared']:>8} {r['exact']:>7} {c['stale']:>6} {c['missing']:>7} "
            f"{c['value_differs']:>7} {r['mismatch_rate']:>8.2%} "
            f"{(f'{max(diffs):.4g}' if diffs else ''):>11} {psi:>7}")
    if few and report["drift_reference_version"]:
        lines.append(f"* PSI over only {report['psi_samples']} vectors (< {PSI_MIN_SAMPLES}): "
                     "mostly sampling noise")
    verdict = "PASS" if report["passed"] else "FAIL"
    lines.append(f"{verdict}: {report['records']} requests; worst feature "
                 f"{report['worst_feature']} at {report['mismatch_rate']:.2%} mismatches "
                 f"(threshold {report['threshold']:.2%}); all cells "
                 f"{report['cell_mismatch_rate']:.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log-dir", type=Path, default=serving_settings().prediction_log_dir,
                   help="prediction log directory (default $SERVING_PREDICTION_LOG_DIR)")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="largest acceptable mismatch rate of any feature (default 0.01)")
    p.add_argument("--since", type=_utc, help="first request time (ISO date or time, UTC)")
    p.add_argument("--until", type=_utc, help="end of the request times (exclusive)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default exact)")
    p.add_argument("--model-dir", type=Path, default=get_settings().model_dir,
                   help="where <version>/reference.json is found (default $TRAINING_MODEL_DIR)")
    p.add_argument("--report", type=Path, default=PROJECT_DIR / "reports" / "skew_audit.json")
    a = p.parse_args(argv)
    if a.log_dir is None:
        p.error("--log-dir is required when SERVING_PREDICTION_LOG_DIR is not set")
    log = read_log(a.log_dir, a.since, a.until)
    if log.empty:
        print(f"no logged requests under {a.log_dir}", file=sys.stderr)
        return 2
    report = audit(log, open_store(), a.model_dir, a.threshold, a.rtol)
    report["log_dir"] = str(a.log_dir)
    a.report.parent.mkdir(parents=True, exist_ok=True)
    a.report.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"report: {a.report}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
