"""`make demo`: the whole system end to end on this machine, with a short summary at the end.

simulate -> batch features -> velocity backfill (the stream's own code) -> `feast apply` ->
`feast materialize-incremental` -> train -> start the scorer -> (stream) push live events
through Kafka and the feature dataflow -> score live transactions and explain them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from devenv.demo_stream import stream_part
from devenv.localproc import free_port
from devenv.steps import background, run, step, wait_http
from feature_repo.config import PROJECT_DIR, apply_env_defaults, data_dir
from scoring.artifact import Artifact, load_artifact
from scoring.config import get_settings
from scoring.loader import resolve_model_path
from scoring.registry import Registry
from training.config import get_settings as training_settings
from training.retrieval import read_transactions


def top_drivers(model: Any, features: list[str], values: dict[str, Any], k: int = 3
                ) -> list[tuple[str, Any, float]]:
    """Features whose removal (set missing) moves this score most: (name, value, delta)."""
    base = np.array([[np.nan if values[f] is None else values[f] for f in features]], float)
    s0 = model.predict_proba(base)[0, 1]
    probes = np.repeat(base, len(features), axis=0)
    probes[np.arange(len(features)), np.arange(len(features))] = np.nan
    deltas = s0 - model.predict_proba(probes)[:, 1]
    order = np.argsort(-np.abs(deltas))[:k]
    return [(features[i], values[features[i]], float(deltas[i])) for i in order]


def show(client: httpx.Client, base: str, txn: dict[str, Any], label: str, model: Any,
         features: list[str]) -> float:
    r = client.post(f"{base}/v1/score?explain=true", json=txn)
    r.raise_for_status()
    out = r.json()
    vals = {k: v["value"] for k, v in out["features"].items()}
    drivers = ", ".join(
        f"{n}={v:.4g}" if isinstance(v, float) else f"{n}={v}"
        for n, v, _ in top_drivers(model, features, vals)
    )
    print(f"    {label:<38} score {out['score']:.3f} -> {out['decision']:<8} top: {drivers}")
    return float(out["score"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--no-stream", action="store_true", help="skip the Kafka part")
    p.add_argument("--stream-processes", type=int, default=1,
                   help="feature dataflow processes (python -m streaming.features -p N)")
    a = p.parse_args(argv)
    if a.stream_processes < 1:
        p.error("--stream-processes must be at least 1")
    apply_env_defaults()
    t_start = time.perf_counter()
    summary: dict[str, Any] = {}
    _offline(a.users, a.days, summary)
    art = _train(summary)
    _serve(art, summary, stream=not a.no_stream, stream_processes=a.stream_processes)
    _summary(summary, time.perf_counter() - t_start)


def _feast(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "feast"), "-c", "feature_repo", *args]


def _offline(users: int, days: int, summary: dict[str, Any]) -> None:
    """Simulate, batch features, backfill, `feast apply` and `materialize-incremental`."""
    py, root = sys.executable, data_dir()
    step(f"simulate {users:,} users x {days} days of card transactions into {root}")
    if (root / "registry.db").exists():
        # A fresh demo: the last demo's online rows go (`feast teardown` deletes the project's
        # keys; its stream's bursts would otherwise still count in the velocity features of
        # the same card holders for ten minutes), and so does its registry (definitions may
        # have changed).
        try:
            run(*_feast("teardown"), quiet=True)
        except SystemExit:  # a registry of older definitions (or Redis down: the next steps say)
            print("    (feast teardown failed, see above; the last demo's online rows stay "
                  "until they age)")
        (root / "registry.db").unlink(missing_ok=True)
    shutil.rmtree(root / "features", ignore_errors=True)
    out = run(py, "-m", "training.simulate", "--users", str(users), "--days", str(days),
              "--end", datetime.now(UTC).date().isoformat())
    summary["simulated"] = out.strip().split(" in ")[0]
    step("batch feature job (daily user and merchant profiles, DuckDB)")
    summary["batch"] = run(py, "-m", "training.batch_features").strip()
    step("velocity backfill: the stream's own dataflow replays the log into the offline store")
    summary["backfill"] = run(py, "-m", "streaming.backfill").strip()
    step("feast apply")
    run(*_feast("apply"), quiet=True)
    step("feast materialize-incremental (offline -> Redis)")
    now = datetime.now(UTC).replace(microsecond=0)
    mat = run(*_feast("materialize-incremental", now.strftime("%Y-%m-%dT%H:%M:%S")), quiet=True)
    summary["materialized"] = [
        re.sub(r"\x1b\[[0-9;]*m", "", line).strip().rstrip(":")
        for line in mat.splitlines() if " from " in line and " to " in line
    ]
    print("    " + "\n    ".join(summary["materialized"]))


def _train(summary: dict[str, Any]) -> Artifact:
    """Train, make the new version champion (the demo serves what it trained), load it."""
    step("train the model from point-in-time features (get_historical_features)")
    run(sys.executable, "-m", "training.train")
    model_dir = training_settings().model_dir
    new = sorted(p for p in model_dir.glob("v*/metadata.json"))[-1].parent
    registry = Registry(model_dir, training_settings().model_registry_url)
    if registry.state()["champion"] != new.name:
        registry.promote(new.name)
    art = load_artifact(resolve_model_path(get_settings()))
    summary["model"] = art.metadata
    return art


def _serve(art: Artifact, summary: dict[str, Any], stream: bool,
           stream_processes: int = 1) -> None:
    """Start the scorer, score and explain three live transactions, then the stream part."""
    env, root = dict(os.environ), data_dir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    step(f"start the scorer on {base}")
    with background([sys.executable, "-m", "serving", "--port", str(port)], env,
                    PROJECT_DIR / ".run" / "demo-scorer.log"):
        wait_http(f"{base}/ready")
        client = httpx.Client(timeout=5)
        step("score live transactions (features as of now)")
        users = _known_users(root)
        t = datetime.now(UTC)
        u0, u1 = users[0], users[1]
        txns = [
            ({"user_id": u0["user_id"], "merchant_id": u0["merchant_id"],
              "amount": round(u0["amount"], 2), "channel": "card_present"},
             "habitual purchase at a usual merchant"),
            ({"user_id": u1["user_id"], "merchant_id": "m0000-new",
              "amount": round(u1["amount"] * 12, 2), "channel": "online"},
             "12x the usual amount, new merchant, online"),
            ({"user_id": "u-never-seen", "merchant_id": u0["merchant_id"], "amount": 35.0,
              "channel": "contactless"}, "unknown card holder"),
        ]
        for i, (txn, label) in enumerate(txns):
            body = {"transaction_id": f"demo-{i}", "currency": "EUR",
                    "event_timestamp": t.isoformat(), **txn}
            show(client, base, body, label, art.model, art.features)
        if stream:
            stream_part(env, client, base, u0, lambda txn, label: show(
                client, base, txn, label, art.model, art.features), summary, step,
                stream_processes)


def _known_users(root: Path) -> list[dict[str, Any]]:
    tx = read_transactions(root, start=datetime.now(UTC) - timedelta(days=3))
    last = tx.sort_values("event_timestamp").groupby("user_id").tail(1)
    return last.sample(2, random_state=1).to_dict("records")


def _summary(s: dict[str, Any], seconds: float) -> None:
    m = s["model"]
    metrics = m["metrics"]
    print("\n" + "=" * 78)
    print(f"demo finished in {seconds:.0f}s")
    print(f"  data          {s['simulated']}")
    print(f"  features      {s['batch']}")
    print(f"                {s['backfill']}")
    for line in s.get("materialized", []):
        print(f"  materialized  {line}")
    print(f"  model         {m['version']} on feature service {m['feature_service']} "
          f"({len(m['features'])} inputs), held out from {m['training_window']['split'][:10]}")
    for name, r in metrics.items():
        rec = next(v for k, v in r.items() if k.startswith("recall_at_fpr"))
        print(f"    {name:<17} ROC-AUC {r['roc_auc']:.3f}  PR-AUC {r['pr_auc']:.3f}  "
              f"recall@1%FPR {rec:.3f}")
    if "stream" in s:
        print(f"  stream        {s['stream']}")
    print(f"  artifact      artifacts/models/{m['version']} (ROC/PR plot: roc_pr.png)")
    print("=" * 78)
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    main()
