"""Behaviour checks of a trained model through the online scorer's own code (issue #19).

`python -m training.acceptance [--day YYYY-MM-DD] [--version V] [--json]` scores four sets of
transactions with the champion of the training job's model directory (`TRAINING_MODEL_DIR`), or
version V of it, against the online store, as the scorer would, and says whether the decisions are those a bank would want:

* `habitual_0300`, `habitual_1200`: 50 ordinary in-store purchases (10-59 EUR, card present or
  contactless) of users with 10 or more transactions in the last 30 days, each at the merchant
  they use most, at 03:00 and at 12:00 UTC: approved (at most 10 % reviewed, none declined)
  whatever the hour means in UTC;
* `big_online`: 4,200 EUR online payments of users whose 30-day mean is 20-35 EUR (about 150x
  their habit), at a merchant new to them and at their favourite one, at 03:00 and 12:00 UTC:
  none approved;
* `unknown_users`: 200 ordinary purchases of users the bank has never seen (no profile, no
  history), at popular merchants, at 03:00 and 12:00 UTC: at least 80 % approved, none declined.

`--day` is the UTC day the transactions happen on (default: the day after the log's last
transaction, whose profile snapshot the batch job writes).  The online store must hold the
features as of that day (`feast materialize`).  Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from feature_repo.config import apply_env_defaults
from feature_repo.contract import TransactionEvent
from scoring.config import ScoringSettings
from scoring.loader import load_scorer
from scoring.scorer import Scorer
from training.config import get_settings
from training.retrieval import read_transactions

IN_STORE = ("card_present", "contactless")
CHANNELS, CHANNEL_P = ["card_present", "contactless", "online", "atm"], [0.5, 0.3, 0.17, 0.03]
BIG_AMOUNT = 4200.0


def _event(tid: str, user: str, merchant: str, amount: float, channel: str,
           at: datetime) -> TransactionEvent:
    return TransactionEvent(transaction_id=tid, user_id=user, merchant_id=merchant,
                            amount=round(float(amount), 2), currency="EUR",
                            channel=channel, event_timestamp=at)  # type: ignore[arg-type]


def scenarios(log: pd.DataFrame, day: datetime, seed: int = 3) -> dict[str, list[TransactionEvent]]:
    """The four sets of transactions, drawn from the log before `day` (deterministic)."""
    rng = np.random.default_rng(seed)
    recent = log[(log["event_timestamp"] >= pd.Timestamp(day - timedelta(days=30)))
                 & (log["event_timestamp"] < pd.Timestamp(day))]
    stats = recent.groupby("user_id")["amount"].agg(["size", "mean"])
    favourite = (recent.groupby(["user_id", "merchant_id"]).size().rename("n").reset_index()
                 .sort_values(["n", "merchant_id"]).groupby("user_id").tail(1)
                 .set_index("user_id")["merchant_id"])
    popular = recent["merchant_id"].value_counts().index.tolist()
    habitual = np.sort(stats.index[stats["size"] >= 10].to_numpy())
    users = rng.choice(habitual, min(50, len(habitual)), replace=False)
    amounts = rng.uniform(10, 59, len(users))
    out: dict[str, list[TransactionEvent]] = {}
    for hour in (3, 12):
        at = day + timedelta(hours=hour)
        out[f"habitual_{hour:02d}00"] = [
            _event(f"acc-h{hour}-{i}", u, favourite[u], a, IN_STORE[i % 2],
                   at + timedelta(seconds=i))
            for i, (u, a) in enumerate(zip(users, amounts, strict=True))]
    modest = stats[(stats["size"] >= 10) & stats["mean"].between(20, 35)].index[:20]
    big = []
    for i, u in enumerate(modest):
        used = set(recent.loc[recent["user_id"] == u, "merchant_id"])
        new = next(m for m in popular if m not in used)
        for hour in (3, 12):
            at = day + timedelta(hours=hour, seconds=i)
            big.append(_event(f"acc-b{hour}-new-{i}", u, new, BIG_AMOUNT, "online", at))
            big.append(_event(f"acc-b{hour}-fav-{i}", u, favourite[u], BIG_AMOUNT, "online", at))
    out["big_online"] = big
    channels = rng.choice(CHANNELS, 200, p=CHANNEL_P)
    unknown_amounts = np.exp(rng.normal(3.4, 0.8, 200))
    out["unknown_users"] = [
        _event(f"acc-u{i}", f"u-acceptance-{i}", popular[i % 30], unknown_amounts[i], channels[i],
               day + timedelta(hours=3 if i % 2 else 12, seconds=i))
        for i in range(200)]
    return out


def _passes(name: str, d: Mapping[Any, int], n: int) -> bool:
    if name.startswith("habitual"):
        return d["decline"] == 0 and d["review"] <= 0.1 * n
    if name == "big_online":
        return d["approve"] == 0
    return d["decline"] == 0 and d["approve"] >= 0.8 * n


def check(scorer: Scorer, cases: dict[str, list[TransactionEvent]]) -> dict[str, dict[str, Any]]:
    """Score every case; per scenario: decisions, score median and range, pass/fail."""
    report = {}
    for name, events in cases.items():
        results = scorer.score(events)
        scores = np.array([r.score for r in results])
        decisions = Counter(r.decision for r in results)
        report[name] = {
            "rows": len(events),
            **{k: decisions[k] for k in ("approve", "review", "decline")},
            "score_median": float(np.median(scores)), "score_min": float(scores.min()),
            "score_max": float(scores.max()),
            "passed": _passes(name, decisions, len(events)),
        }
        if name == "big_online":
            ratios = [r.vector.values["txn_amount_to_mean_30d"] for r in results]
            report[name]["amount_to_mean_median"] = float(np.nanmedian(np.array(ratios, float)))
    return report


def main(argv: list[str] | None = None) -> int:
    apply_env_defaults()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--day", type=date.fromisoformat, default=None,
                   help="UTC day of the transactions (default: the day after the log ends)")
    p.add_argument("--version", default=None, help="a registered version (default: champion)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    log = read_transactions()
    last = log["event_timestamp"].max()
    d = a.day or (last.floor("D") + pd.Timedelta(days=1)).date()
    day = datetime(d.year, d.month, d.day, tzinfo=UTC)
    scorer = load_scorer(ScoringSettings(model_dir=get_settings().model_dir,
                                         model_version=a.version))
    report = check(scorer, scenarios(log, day))
    if a.json:
        print(json.dumps({"model_version": scorer.artifact.version, "day": d.isoformat(),
                          "thresholds": vars(scorer.thresholds), "scenarios": report}))
    else:
        t = scorer.thresholds
        print(f"model {scorer.artifact.version}, review >= {t.review:.4f}, decline >= "
              f"{t.decline:.4f}, transactions on {d}:")
        for name, r in report.items():
            print(f"  {name:<15} {r['rows']:>4} rows: approve {r['approve']:>3}  review "
                  f"{r['review']:>3}  decline {r['decline']:>3}  score median "
                  f"{r['score_median']:.4f} [{r['score_min']:.4f}, {r['score_max']:.4f}]  "
                  f"{'ok' if r['passed'] else 'FAILED'}")
    return 0 if all(r["passed"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
