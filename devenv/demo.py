"""`make demo`: the whole system end to end on this machine, with a short summary at the end.

simulate -> batch features -> velocity backfill (the stream's own code) -> `feast apply` ->
`feast materialize-incremental` -> train -> start the scorer -> (stream) push live events
through Kafka and the feature dataflow -> score live transactions and explain them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from feature_repo.config import PROJECT_DIR, apply_env_defaults, data_dir

STEP = 0


def step(msg: str) -> None:
    global STEP
    STEP += 1
    print(f"\n[{STEP}] {msg}", flush=True)


def run(*cmd: str, quiet: bool = False) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=PROJECT_DIR, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"demo step failed: {' '.join(cmd)}")
    out = "\n".join(
        line for line in proc.stdout.splitlines() if "Warning" not in line and line.strip()
    )
    if not quiet and out:
        print("    " + out.replace("\n", "\n    "))
    print(f"    ({time.perf_counter() - t0:.1f}s)", flush=True)
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=PROJECT_DIR, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit(f"{url} did not become ready in {timeout:.0f}s")


def top_drivers(model: Any, features: list[str], values: dict[str, Any], k: int = 3
                ) -> list[tuple[str, Any, float]]:
    """Features whose removal (set missing) moves this score most: (name, value, delta)."""
    import numpy as np

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
    a = p.parse_args(argv)
    apply_env_defaults()
    env = dict(os.environ)
    py = sys.executable
    feast = [str(Path(py).parent / "feast"), "-c", "feature_repo"]
    t_start = time.perf_counter()
    root = data_dir()
    today = datetime.now(UTC).date()
    summary: dict[str, Any] = {}

    step(f"simulate {a.users:,} users x {a.days} days of card transactions into {root}")
    if (root / "registry.db").exists():
        (root / "registry.db").unlink()  # a fresh demo registry: definitions may have changed
    shutil.rmtree(root / "features", ignore_errors=True)
    out = run(py, "-m", "training.simulate", "--users", str(a.users), "--days", str(a.days),
              "--end", today.isoformat())
    summary["simulated"] = out.strip().split(" in ")[0]
    step("batch feature job (daily user and merchant profiles, DuckDB)")
    summary["batch"] = run(py, "-m", "training.batch_features").strip()
    step("velocity backfill: the stream's own dataflow replays the log into the offline store")
    summary["backfill"] = run(py, "-m", "streaming.backfill").strip()
    step("feast apply")
    run(*feast, "apply", quiet=True)
    step("feast materialize-incremental (offline -> Redis)")
    now = datetime.now(UTC).replace(microsecond=0)
    mat = run(*feast, "materialize-incremental", now.strftime("%Y-%m-%dT%H:%M:%S"), quiet=True)
    summary["materialized"] = [
        re.sub(r"\x1b\[[0-9;]*m", "", line).strip().rstrip(":")
        for line in mat.splitlines() if " from " in line and " to " in line
    ]
    print("    " + "\n    ".join(summary["materialized"]))
    step("train the model from point-in-time features (get_historical_features)")
    run(py, "-m", "training.train")
    from scoring.artifact import load_artifact
    from scoring.config import get_settings
    from scoring.loader import resolve_model_path
    from scoring.registry import Registry
    from training.config import get_settings as training_settings

    new = sorted(p for p in training_settings().model_dir.glob("v*/metadata.json"))[-1].parent
    registry = Registry(training_settings().model_dir)
    if registry.state()["champion"] != new.name:
        registry.promote(new.name)  # the demo serves the model it just trained
    art = load_artifact(resolve_model_path(get_settings()))
    summary["model"] = art.metadata

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    step(f"start the scorer on {base}")
    with background([py, "-m", "serving", "--port", str(port)], env,
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
        scores = []
        for i, (txn, label) in enumerate(txns):
            body = {"transaction_id": f"demo-{i}", "currency": "EUR",
                    "event_timestamp": t.isoformat(), **txn}
            scores.append(show(client, base, body, label, art.model, art.features))
        if not a.no_stream:
            from devenv.demo_stream import stream_part

            stream_part(env, client, base, u0, lambda txn, label: show(
                client, base, txn, label, art.model, art.features), summary, step)

    _summary(summary, time.perf_counter() - t_start)


def _known_users(root: Path) -> list[dict[str, Any]]:
    from training.retrieval import read_transactions

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
