"""Simulated card-transaction history with realistic fraud patterns (deterministic, vectorised).

`python -m training.simulate --users 2000 --days 60 --seed 7 --end 2026-11-22` writes

* `$FRAUD_DATA_DIR/transactions/date=YYYY-MM-DD/part-0.parquet`: `transaction_id, user_id,
  merchant_id, amount, currency, channel, event_timestamp` (UTC, microseconds);
* `$FRAUD_DATA_DIR/labels.parquet`: `transaction_id, is_fraud, label_timestamp`; a fraud is
  reported 1 hour to 10 days after it happened, a legitimate transaction is confirmed 3 days
  after it.

Same arguments, same bytes.  Fraud patterns, all detectable by the feature set: card-testing
bursts (many small online payments within minutes, then large ones), amounts far above the
user's habit, risky merchants, merchants new to the user, and night hours.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_repo.config import apply_env_defaults
from feature_repo.paths import labels_path, transactions_dir

US_PER_DAY = 86_400_000_000
US_PER_HOUR = 3_600_000_000
CHANNELS = np.array(["card_present", "contactless", "online", "atm"])
NORMAL_CHANNEL_P = [0.5, 0.3, 0.17, 0.03]
# Hour-of-day profile of legitimate spending: quiet at night, busy from late morning.
HOUR_P = np.array([1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 2, 3, 4, 5, 6, 7, 6, 6, 6, 6, 7, 7, 6, 5, 4, 3, 2])
HOUR_P = HOUR_P / HOUR_P.sum()


@dataclass(frozen=True)
class SimConfig:
    users: int = 2000
    days: int = 60
    seed: int = 7
    end: date = date(2026, 11, 22)  # the CLI defaults to today
    txns_per_user_day: float = 1.5
    fraud_episode_rate: float = 0.0025  # episodes per user per day


def _ids(prefix: str, n: int) -> np.ndarray:
    width = len(str(max(n - 1, 1)))
    return np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), width))


def simulate(cfg: SimConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (transactions, labels), both sorted by event time."""
    rng = np.random.default_rng(cfg.seed)
    end_us = int(datetime(cfg.end.year, cfg.end.month, cfg.end.day, tzinfo=UTC).timestamp()) * 10**6
    start_us = end_us - cfg.days * US_PER_DAY
    n_merchants = max(50, cfg.users // 10)

    # Zipf-like popularity (rank^-1.1), shuffled over ids: a few big merchants, a long tail
    merchant_pop = 1.0 / np.arange(1, n_merchants + 1) ** 1.1
    rng.shuffle(merchant_pop)
    merchant_pop /= merchant_pop.sum()
    risky = rng.random(n_merchants) < 0.05
    risky_idx = np.flatnonzero(risky)

    # --- legitimate behaviour -----------------------------------------------------------
    rate = rng.gamma(2.0, cfg.txns_per_user_day / 2.0, cfg.users)
    habit_mu = rng.normal(3.4, 0.6, cfg.users)  # log-amount mean, ~EUR 30
    n_txn = rng.poisson(rate * cfg.days)
    user = np.repeat(np.arange(cfg.users), n_txn)
    n = user.size
    day = rng.integers(0, cfg.days, n)
    hour = rng.choice(24, n, p=HOUR_P)
    ts = start_us + day * US_PER_DAY + hour * US_PER_HOUR + rng.integers(0, US_PER_HOUR, n)
    favourites = rng.choice(n_merchants, (cfg.users, 8), p=merchant_pop)
    at_favourite = rng.random(n) < 0.9
    merchant = np.where(
        at_favourite,
        favourites[user, rng.integers(0, 8, n)],
        rng.choice(n_merchants, n, p=merchant_pop),
    )
    amount = np.exp(rng.normal(habit_mu[user], 0.8))
    # legitimate shopping sprees: some transactions come in quick runs at familiar merchants
    spree = rng.random(n) < 0.04
    ts = np.where(spree, ts - ts % US_PER_HOUR + rng.integers(0, 15 * 60_000_000, n), ts)
    channel = rng.choice(len(CHANNELS), n, p=NORMAL_CHANNEL_P)
    fraud = np.zeros(n, dtype=bool)

    # --- fraud episodes -----------------------------------------------------------------
    n_ep = rng.poisson(cfg.fraud_episode_rate * cfg.users * cfg.days)
    ep_user = rng.integers(0, cfg.users, n_ep)
    ep_start = start_us + rng.integers(0, cfg.days * US_PER_DAY, n_ep)
    night = rng.random(n_ep) < 0.3  # some episodes move to 01:00-05:00 that day
    ep_start = np.where(
        night,
        ep_start - ep_start % US_PER_DAY + rng.integers(1, 5, n_ep) * US_PER_HOUR,
        ep_start,
    )
    card_testing = rng.random(n_ep) < 0.5
    ep_len = np.where(card_testing, rng.integers(4, 12, n_ep), rng.integers(1, 4, n_ep))
    f_ep = np.repeat(np.arange(n_ep), ep_len)
    f_pos = np.arange(f_ep.size) - np.repeat(np.cumsum(ep_len) - ep_len, ep_len)
    f_user = ep_user[f_ep]
    gap = np.where(card_testing[f_ep], 20_000_000, 300_000_000)  # ~20 s or ~5 min apart
    f_ts = ep_start[f_ep] + f_pos * gap + rng.integers(0, 10_000_000, f_ep.size)
    f_merchant = np.where(
        rng.random(f_ep.size) < 0.3,
        risky_idx[rng.integers(0, max(risky_idx.size, 1), f_ep.size)] if risky_idx.size else 0,
        rng.choice(n_merchants, f_ep.size, p=merchant_pop),
    )
    probing = card_testing[f_ep] & (f_pos < ep_len[f_ep] - 2)
    f_amount = np.where(
        probing,
        rng.uniform(2.0, 25.0, f_ep.size),
        np.exp(habit_mu[f_user] + rng.normal(0.0, 0.8, f_ep.size)) * rng.uniform(1.0, 4.0, f_ep.size),
    )
    f_channel = np.where(rng.random(f_ep.size) < 0.5, 2, rng.choice(4, f_ep.size, p=NORMAL_CHANNEL_P))
    keep = (f_ts >= start_us) & (f_ts < end_us)

    user = np.concatenate([user, f_user[keep]])
    ts = np.concatenate([ts, f_ts[keep]])
    merchant = np.concatenate([merchant, f_merchant[keep]])
    amount = np.round(np.concatenate([amount, f_amount[keep]]), 2).clip(0.01, None)
    channel = np.concatenate([channel, f_channel[keep]])
    fraud = np.concatenate([fraud, np.ones(int(keep.sum()), dtype=bool)])

    order = np.lexsort((merchant, user, ts))
    user, ts, merchant, amount = user[order], ts[order], merchant[order], amount[order]
    channel, fraud = channel[order], fraud[order]
    total = ts.size
    txn_id = _ids("t", total)
    tx = pd.DataFrame(
        {
            "transaction_id": txn_id,
            "user_id": _ids("u", cfg.users)[user],
            "merchant_id": _ids("m", n_merchants)[merchant],
            "amount": amount,
            "currency": "EUR",
            "channel": CHANNELS[channel],
            "event_timestamp": pd.to_datetime(ts, unit="us", utc=True).astype("datetime64[us, UTC]"),
        }
    )
    delay = np.where(
        fraud,
        rng.integers(US_PER_HOUR, 10 * US_PER_DAY, total),
        3 * US_PER_DAY,
    )
    labels = pd.DataFrame(
        {
            "transaction_id": txn_id,
            "is_fraud": fraud.astype("int8"),
            "label_timestamp": pd.to_datetime(ts + delay, unit="us", utc=True).astype(
                "datetime64[us, UTC]"
            ),
        }
    )
    return tx, labels


def write(tx: pd.DataFrame, labels: pd.DataFrame, root: Path) -> None:
    """Write the partitioned log and the labels deterministically (replacing old output)."""
    out = transactions_dir(root)
    if out.exists():
        shutil.rmtree(out)
    days = tx["event_timestamp"].dt.strftime("%Y-%m-%d").to_numpy()
    bounds = np.flatnonzero(days[1:] != days[:-1]) + 1
    schema = pa.Schema.from_pandas(tx, preserve_index=False).remove_metadata()
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(tx)], strict=True):
        part = out / f"date={days[lo]}"
        part.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(tx.iloc[lo:hi], schema=schema, preserve_index=False)
        pq.write_table(table.replace_schema_metadata(None), part / "part-0.parquet")
    lt = pa.Table.from_pandas(labels, preserve_index=False)
    pq.write_table(lt.replace_schema_metadata(None), labels_path(root))


def main(argv: list[str] | None = None) -> None:
    apply_env_defaults()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=SimConfig.users)
    p.add_argument("--days", type=int, default=SimConfig.days)
    p.add_argument("--seed", type=int, default=SimConfig.seed)
    p.add_argument("--end", type=date.fromisoformat, default=datetime.now(UTC).date(),
                   help="exclusive end date (UTC midnight), default today")
    p.add_argument("--txns-per-user-day", type=float, default=SimConfig.txns_per_user_day)
    p.add_argument("--out", type=Path, default=None, help="default $FRAUD_DATA_DIR")
    a = p.parse_args(argv)
    from feature_repo.config import data_dir

    root = a.out or data_dir()
    t0 = time.perf_counter()
    cfg = SimConfig(a.users, a.days, a.seed, a.end, a.txns_per_user_day)
    tx, labels = simulate(cfg)
    t1 = time.perf_counter()
    write(tx, labels, root)
    t2 = time.perf_counter()
    print(
        f"simulated {len(tx):,} transactions ({labels['is_fraud'].mean():.2%} fraud) for "
        f"{a.users:,} users over {a.days} days ending {a.end} in {t1 - t0:.1f}s; "
        f"written to {root} in {t2 - t1:.1f}s"
    )


if __name__ == "__main__":
    main()
