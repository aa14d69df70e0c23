"""Train the fraud model from point-in-time features and write a versioned artifact.

`python -m training.train` pulls the training frame of the model's feature service for every
labelled transaction, splits by time (the most recent `test_fraction` is held out), fits a
scikit-learn pipeline (missing values are handled inside it, so serving imputes exactly as
training did), reports ROC-AUC, PR-AUC and recall at a fixed low false-positive rate with and
without the velocity features, saves ROC/PR plots, and writes
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

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from scoring.artifact import save_artifact, service_feature_names
from scoring.drift import write_reference
from scoring.registry import Registry
from training.config import TrainingSettings, get_settings
from training.model import make_pipeline
from training.retrieval import labelled_entity_frame, open_store, training_frame

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


def time_split(frame: pd.DataFrame, test_fraction: float) -> tuple[pd.Series, pd.Timestamp]:
    """Boolean test mask (latest `test_fraction` of the period) and the split time."""
    ts = frame["event_timestamp"]
    split = ts.min() + (ts.max() - ts.min()) * (1 - test_fraction)
    return ts >= split, split


def plot_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    import matplotlib

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


def train(settings: TrainingSettings, frame: pd.DataFrame | None = None) -> Path:
    """Train, evaluate and write the artifact; return its directory."""
    store = open_store(settings.feature_repo)
    service = store.get_feature_service(settings.feature_service)
    features = service_feature_names(service)
    ablation = service_feature_names(store.get_feature_service(settings.ablation_feature_service))
    t0 = time.perf_counter()
    if frame is None:
        frame = training_frame(store, settings.feature_service, labelled_entity_frame())
    t_ret = time.perf_counter() - t0
    test, split = time_split(frame, settings.test_fraction)
    y = frame["is_fraud"].to_numpy()
    results: dict[str, dict[str, float]] = {}
    curves = {}
    model = None
    for name, cols in (("with_velocity", features), ("without_velocity", ablation)):
        pipe = make_pipeline(settings.seed)
        pipe.fit(frame.loc[~test, cols].to_numpy("float64"), y[~test])
        score = pipe.predict_proba(frame.loc[test, cols].to_numpy("float64"))[:, 1]
        results[name] = evaluate(y[test], score, settings.max_fpr)
        curves[name] = (y[test], score)
        if name == "with_velocity":
            model = pipe
    now = datetime.now(UTC)
    version = now.strftime("v%Y%m%d-%H%M%S")
    out = settings.model_dir / version
    best = results["with_velocity"]
    review = best["threshold_at_fpr"]
    meta = {
        "version": version,
        "created_at": now.isoformat(),
        "feature_service": settings.feature_service,
        "features": features,
        "training_window": {
            "start": frame["event_timestamp"].min().isoformat(),
            "split": split.isoformat(),
            "end": frame["event_timestamp"].max().isoformat(),
            "train_rows": int((~test).sum()),
            "test_rows": int(test.sum()),
        },
        "metrics": results,
        # decline above the 0.1% FPR point, review above the configured FPR point
        "thresholds": {
            "review": review,
            "decline": max(recall_at_fpr(*curves["with_velocity"], settings.max_fpr / 10)[1],
                           review),
        },
        "libraries": {lib: pkg_version(lib) for lib in LIBRARIES},
        "python": platform.python_version(),
        "retrieval_seconds": round(t_ret, 2),
    }
    save_artifact(out, model, meta)
    # training distribution of every input: the drift reference (scoring/drift.py)
    write_reference(out, {f: frame.loc[~test, f] for f in features})
    plot_curves(curves, out / "roc_pr.png")
    Registry(settings.model_dir).register(out)
    return out


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
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
    print(f"  artifact: {out}  plots: {out / 'roc_pr.png'}")
    champion = Registry(settings.model_dir).state()["champion"]
    if champion != meta["version"]:
        print(f"  champion stays {champion}: python -m training.registry promote {meta['version']}")


if __name__ == "__main__":
    main()
