"""Train the fraud model from point-in-time features and write a versioned artifact.

`python -m training.train` pulls the training frame of the model's feature service for every
labelled transaction and splits it by time into a training period, a validation period (the
`validation_fraction` before the held-out part) and a held-out test period (the most recent
`test_fraction`).  It fits a scikit-learn pipeline on the training period (missing values are
handled inside it, so serving imputes exactly as training did; no class re-weighting, so scores
are probabilities), chooses the review and decline thresholds on the validation period for the
alert budget (`training.thresholds`), and reports on the held-out period: ROC-AUC, PR-AUC,
recall at a fixed low false-positive rate with and without the velocity features, calibration,
and the review and decline rates and precision overall and per hour of day, UTC and in the card
holder's own time zone.  It saves ROC/PR plots and writes
`artifacts/models/<version>/{model.joblib,metadata.json,reference.json,roc_pr.png}`
(reference.json: the training distribution of each input, for drift) and registers the version in
the model registry (the first version becomes champion; later ones wait for `promote`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from feature_repo.progress import Progress, progress, show_summaries
from scoring.artifact import save_artifact, service_feature_names
from scoring.drift import write_reference
from scoring.registry import Registry
from training.config import TrainingSettings, get_settings
from training.model import make_pipeline
from training.retrieval import labelled_entity_frame, open_store, training_frame
from training.thresholds import AlertBudget, calibration, choose_thresholds, decision_rows

LIBRARIES = ("feast", "scikit-learn", "pandas", "numpy", "pyarrow", "joblib")


def recall_at_fpr(y: np.ndarray, score: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """(recall, threshold) at the highest threshold whose false-positive rate <= max_fpr."""
    fpr, tpr, thr = roc_curve(y, score)
    ok = np.flatnonzero(fpr <= max_fpr)
    i = ok[-1]
    return float(tpr[i]), float(min(thr[i], 1.0))


def evaluate(y: np.ndarray, score: np.ndarray, max_fpr: float) -> dict[str, float]:
    recall, threshold = recall_at_fpr(y, score, max_fpr)
    return {
        "roc_auc": float(roc_auc_score(y, score)),
        "pr_auc": float(average_precision_score(y, score)),
        f"recall_at_fpr_{max_fpr:g}": recall,
        "threshold_at_fpr": threshold,
        "positives": int(y.sum()),
        "rows": int(len(y)),
    }


def time_split(frame: pd.DataFrame, validation_fraction: float, test_fraction: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.Timestamp, pd.Timestamp]:
    """(train, validation, test) boolean masks over consecutive periods, and the two split times:
    test is the latest `test_fraction` of the period, validation the `validation_fraction`
    before it."""
    ts = frame["event_timestamp"]
    span = ts.max() - ts.min()
    test_start = ts.min() + span * (1 - test_fraction)
    val_start = ts.min() + span * (1 - test_fraction - validation_fraction)
    test = (ts >= test_start).to_numpy()
    val = ((ts >= val_start) & (ts < test_start)).to_numpy()
    return ~(test | val), val, test, val_start, test_start


def hour_groups(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """Hour of day of each row, UTC and in the card holder's time zone (NaN when unknown)."""
    return {"utc": frame["event_timestamp"].dt.hour,
            "local": np.floor(frame["txn_hour_local"].astype("float64"))}


def decision_report(y: np.ndarray, score: np.ndarray, thresholds: dict[str, float],
                    frame: pd.DataFrame) -> dict[str, Any]:
    """Decision rates and precision overall and per hour (UTC, local), JSON-ready."""
    out: dict[str, Any] = {"overall": decision_rows(y, score, thresholds)["all"]}
    for name, hours in hour_groups(frame).items():
        rows = decision_rows(y, score, thresholds, hours.to_numpy())
        out[f"by_hour_{name}"] = [{"hour": int(h), **row} for h, row in rows.items()]
    return out


def plot_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    import matplotlib  # plotting only: loaded when a plot is drawn, its backend chosen first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax1.plot(fpr, tpr, label=name)
        p, r, _ = precision_recall_curve(y, s)
        ax2.plot(r, p, label=name)
    ax1.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax1.set(xscale="log", xlim=(1e-4, 1), xlabel="false-positive rate (log)",
            ylabel="recall", title="ROC (held-out period)")
    ax2.set(xlabel="recall", ylabel="precision", title="Precision-recall (held-out period)")
    for ax in (ax1, ax2):
        ax.legend(loc="lower right" if ax is ax1 else "upper right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# what `train` does, in order: the steps of its progress bar
STEPS = ("retrieve training frame", "fit with_velocity", "fit without_velocity",
         "choose thresholds", "write artifact")


def train(settings: TrainingSettings, frame: pd.DataFrame | None = None) -> Path:
    """Train, choose thresholds, evaluate and write the artifact; return its directory.
    A progress bar of `STEPS` on a terminal; one INFO line at the end."""
    with progress("train", total=len(STEPS), unit="steps") as bar:
        return _train(settings, frame, bar)


def _train(settings: TrainingSettings, frame: pd.DataFrame | None, bar: Progress) -> Path:
    started = False

    def step(name: str) -> None:  # `name` starts: the step before it is done
        nonlocal started
        if started:
            bar.update()
        started = True
        bar.step(name)

    step(STEPS[0])
    store = open_store(settings.feature_repo)
    service = store.get_feature_service(settings.feature_service)
    features = service_feature_names(service)
    ablation = service_feature_names(store.get_feature_service(settings.ablation_feature_service))
    t0 = time.perf_counter()
    if frame is None:
        frame = training_frame(store, settings.feature_service, labelled_entity_frame())
    t_ret = time.perf_counter() - t0
    fit, val, test, val_start, test_start = time_split(
        frame, settings.validation_fraction, settings.test_fraction)
    y = frame["is_fraud"].to_numpy()
    results: dict[str, dict[str, float]] = {}
    curves = {}
    models = {}
    for name, cols in (("with_velocity", features), ("without_velocity", ablation)):
        step(f"fit {name}")
        pipe = make_pipeline(settings.seed)
        pipe.fit(frame.loc[fit, cols].to_numpy("float64"), y[fit])
        score = pipe.predict_proba(frame.loc[test, cols].to_numpy("float64"))[:, 1]
        results[name] = evaluate(y[test], score, settings.max_fpr)
        curves[name] = (y[test], score)
        models[name] = pipe
    model = models["with_velocity"]
    step(STEPS[3])
    budget = AlertBudget(settings.max_review_rate, settings.min_decline_precision)
    val_score = model.predict_proba(frame.loc[val, features].to_numpy("float64"))[:, 1]
    thresholds = choose_thresholds(y[val], val_score, budget)
    test_y, test_score = curves["with_velocity"]
    now = datetime.now(UTC)
    version = now.strftime("v%Y%m%d-%H%M%S")
    out = settings.model_dir / version
    bar.note = f"({len(frame):,} rows, model {version})"
    meta = {
        "version": version,
        "created_at": now.isoformat(),
        "feature_service": settings.feature_service,
        "features": features,
        "training_window": {
            "start": frame["event_timestamp"].min().isoformat(),
            "validation_start": val_start.isoformat(),
            "split": test_start.isoformat(),
            "end": frame["event_timestamp"].max().isoformat(),
            "train_rows": int((fit | val).sum()),  # before the held-out period: fit + validation
            "fit_rows": int(fit.sum()),
            "validation_rows": int(val.sum()),
            "test_rows": int(test.sum()),
        },
        "metrics": results,
        # chosen on the validation period for the alert budget (training/thresholds.py)
        "thresholds": thresholds,
        "alert_budget": budget.as_dict(),
        "decisions": {
            "validation": decision_rows(y[val], val_score, thresholds)["all"],
            "test": decision_report(test_y, test_score, thresholds, frame.loc[test]),
        },
        "calibration": calibration(test_y, test_score),
        "libraries": {lib: pkg_version(lib) for lib in LIBRARIES},
        "python": platform.python_version(),
        "retrieval_seconds": round(t_ret, 2),
    }
    step(STEPS[4])
    save_artifact(out, model, meta)
    # distribution of every input before the held-out period: the drift reference
    # (scoring/drift.py)
    write_reference(out, {f: frame.loc[fit | val, f] for f in features})
    plot_curves(curves, out / "roc_pr.png")
    Registry(settings.model_dir, settings.model_registry_url).register(out)
    bar.update()
    return out


def _pct(v: float | None) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}"  # None: no rows to measure


def format_decisions(meta: dict[str, Any]) -> str:
    """The decision report of an artifact's metadata as text tables."""
    b, t, d = meta["alert_budget"], meta["thresholds"], meta["decisions"]
    lines = [f"  thresholds: review >= {t['review']:.4f}, decline >= {t['decline']:.4f} "
             f"(budget: review rate <= {b['max_review_rate']:.1%}, decline precision >= "
             f"{b['min_decline_precision']:.0%}, chosen on the validation period)",
             "  period      rows  frauds  review%  prec%  decline%  prec%  caught%"]
    for name, r in (("validation", d["validation"]), ("held-out", d["test"]["overall"])):
        lines.append(f"  {name:<10} {r['rows']:>5} {r['frauds']:>7}   {_pct(r['review_rate'])} "
                     f"{_pct(r['review_precision'])}    {_pct(r['decline_rate'])} "
                     f"{_pct(r['decline_precision'])}    {_pct(r['fraud_caught'])}")
    c = meta["calibration"]
    lines.append(f"  calibration (held-out): mean score {c['mean_score']:.4f} vs fraud rate "
                 f"{c['fraud_rate']:.4f}, Brier {c['brier']:.4f}, "
                 f"ECE {c['expected_calibration_error']:.4f}")
    lines.append("  per hour of day (held-out):       UTC                  card holder's local")
    lines.append("  hour          rows review% decline% alert-prec%   rows review% decline% "
                 "alert-prec%")
    utc = {r["hour"]: r for r in d["test"]["by_hour_utc"]}
    local = {r["hour"]: r for r in d["test"]["by_hour_local"]}

    def cols(r: dict[str, Any] | None) -> str:
        if r is None:
            return f"{0:>6}       -        -           -"
        return (f"{r['rows']:>6}   {_pct(r['review_rate'])}    {_pct(r['decline_rate'])}"
                f"       {_pct(r['alert_precision'])}")

    for h in range(24):
        lines.append(f"  {h:02d}:00      {cols(utc.get(h))}  {cols(local.get(h))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    show_summaries()
    settings = get_settings()
    t0 = time.perf_counter()
    out = train(settings)
    meta = json.loads((out / "metadata.json").read_text())
    rows = []
    for name, m in meta["metrics"].items():
        rec = next(v for k, v in m.items() if k.startswith("recall_at_fpr"))
        rows.append(f"  {name:<17} ROC-AUC {m['roc_auc']:.4f}  PR-AUC {m['pr_auc']:.4f}  "
                    f"recall@FPR{settings.max_fpr:g} {rec:.3f}")
    print(f"model {meta['version']} ({meta['feature_service']}, {len(meta['features'])} features) "
          f"trained in {time.perf_counter() - t0:.1f}s "
          f"(retrieval {meta['retrieval_seconds']}s), held-out from "
          f"{meta['training_window']['split'][:10]}:")
    print("\n".join(rows))
    print(format_decisions(meta))
    print(f"  artifact: {out}  plots: {out / 'roc_pr.png'}")
    champion = Registry(settings.model_dir, settings.model_registry_url).state()["champion"]
    if champion != meta["version"]:
        print(f"  champion stays {champion}: python -m training.registry promote {meta['version']}")


if __name__ == "__main__":
    main()
