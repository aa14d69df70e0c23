"""Simulated card-transaction history with realistic fraud patterns (deterministic, vectorised).

`python -m training.simulate --users 2000 --days 60 --seed 7 --end 2026-11-22` writes

* `$FRAUD_DATA_DIR/transactions/date=YYYY-MM-DD/part-0.parquet`: `transaction_id, user_id,
  merchant_id, amount, currency, channel, event_timestamp` (UTC, microseconds);
* `$FRAUD_DATA_DIR/labels.parquet`: `transaction_id, is_fraud, label_timestamp`; a fraud is
  reported 1 hour to 10 days after it happened, a legitimate transaction is confirmed 3 days
  after it;
* `$FRAUD_DATA_DIR/customers.parquet`: `user_id, home_utc_offset_hours, opened_at`, the card
  holder's home time zone and when the account opened, from the bank's customer records.

Same arguments, same bytes.  Card holders live in time zones from UTC-8 to UTC+10 and keep
their own daily rhythm (a few work nights), so ordinary shopping happens at every UTC hour; a
fifth of the accounts open during the period, and their first day is legitimate (no profile
yet, nothing for a fraudster to have stolen).  Fraud comes in episodes at hours unusual for the victim (mostly their local night,
otherwise whenever the fraudster is awake), of three kinds, all detectable by the feature set:

* card testing: bursts of small online payments seconds apart, then a cash-out at 3-20x the
  user's mean amount;
* account takeover: one to three online payments at 50-200x the user's mean amount;
* stolen card: shop and ATM transactions at 2-8x the mean, minutes apart;

at merchants new to the user (30-40 % of them risky ones), except that a taken-over account
sometimes buys from the victim's own shops.  Legitimate big purchases (5-30x the mean, 0.5 % of
them) keep "large" alone from meaning fraud.
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

from feature_repo.config import apply_env_defaults, data_dir
from feature_repo.paths import customers_path, labels_path, transactions_dir

US_PER_DAY = 86_400_000_000
US_PER_HOUR = 3_600_000_000
US_PER_MIN = 60_000_000
CHANNELS = np.array(["card_present", "contactless", "online", "atm"])
ONLINE, ATM = 2, 3
NORMAL_CHANNEL_P = [0.5, 0.3, 0.17, 0.03]
# Hour-of-day profile of legitimate spending in the card holder's *local* time: quiet at night,
# busy from late morning.
HOUR_P = np.array([1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 2, 3, 4, 5, 6, 7, 6, 6, 6, 6, 7, 7, 6, 5, 4, 3, 2])
HOUR_P = HOUR_P / HOUR_P.sum()
# Card holders' home time zones (UTC offset, hours): a European bank with customers abroad, so
# 03:00 UTC is mid-morning for some of them and evening for others.
ZONES = np.array([-8.0, -5.0, -3.0, 0.0, 1.0, 2.0, 3.0, 5.5, 8.0, 9.0, 10.0])
ZONE_P = np.array([0.04, 0.08, 0.03, 0.15, 0.35, 0.15, 0.05, 0.04, 0.05, 0.04, 0.02])
# Fraud episode kinds: card testing, big-ticket account takeover, stolen-card spree.
TESTING, TAKEOVER, STOLEN = 0, 1, 2
KIND_P = [0.35, 0.3, 0.35]


@dataclass(frozen=True)
class SimConfig:
    users: int = 2000
    days: int = 60
    seed: int = 7
    end: date = date(2026, 11, 22)  # the CLI defaults to today
    txns_per_user_day: float = 1.5
    fraud_episode_rate: float = 0.004  # episodes per active user per day
    new_user_share: float = 0.2  # users whose account opens during the period


def _ids(prefix: str, n: int) -> np.ndarray:
    width = len(str(max(n - 1, 1)))
    return np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), width))


def _at_local_hour(day_us: np.ndarray, local_hour: np.ndarray, offset: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """A random instant in `local_hour` (card holder's zone) of the UTC day starting `day_us`."""
    utc_hour = local_hour - offset
    return day_us + (utc_hour * US_PER_HOUR).astype(np.int64) + rng.integers(
        0, US_PER_HOUR, day_us.size)


def _start_us(cfg: SimConfig) -> int:
    end = datetime(cfg.end.year, cfg.end.month, cfg.end.day, tzinfo=UTC)
    return int(end.timestamp()) * 10**6 - cfg.days * US_PER_DAY


def _card_holders(cfg: SimConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(home UTC offset in hours, day of the period the account opens (0: before it), when it
    opened in epoch microseconds), from their own random stream."""
    rng = np.random.default_rng([cfg.seed, 1])
    offset = rng.choice(ZONES, cfg.users, p=ZONE_P)
    is_new = rng.random(cfg.users) < cfg.new_user_share
    first_day = np.where(is_new, rng.integers(1, max(cfg.days, 2), cfg.users), 0)
    before = rng.integers(30, 3650, cfg.users) * US_PER_DAY
    opened = _start_us(cfg) + np.where(is_new, first_day * US_PER_DAY, -before)
    return offset, first_day, opened


def customers(cfg: SimConfig) -> pd.DataFrame:
    """The bank's customer records: `user_id, home_utc_offset_hours` (home time zone),
    `opened_at` (when the account opened; during the period for new accounts)."""
    offset, _, opened = _card_holders(cfg)
    return pd.DataFrame({
        "user_id": _ids("u", cfg.users), "home_utc_offset_hours": offset,
        "opened_at": pd.to_datetime(opened, unit="us", utc=True).astype("datetime64[us, UTC]"),
    })


@dataclass
class _World:
    """What the legitimate and the fraudulent behaviour are drawn from (one random stream)."""

    n_merchants: int
    merchant_pop: np.ndarray  # popularity of each merchant, sums to 1
    risky_idx: np.ndarray  # merchants fraudsters favour
    offset: np.ndarray  # each user's home UTC offset (hours)
    first_day: np.ndarray  # day the account opened (0: before the period)
    shift: np.ndarray  # each user's personal shift of the day (hours)
    favourites: np.ndarray | None = None  # (users, 8) merchants each user shops at
    habit_mean: np.ndarray | None = None  # mean of each user's lognormal amounts


def _world(cfg: SimConfig, rng: np.random.Generator) -> _World:
    n_merchants = max(50, cfg.users // 10)
    # Zipf-like popularity (rank^-1.1), shuffled over ids: a few big merchants, a long tail
    merchant_pop = 1.0 / np.arange(1, n_merchants + 1) ** 1.1
    rng.shuffle(merchant_pop)
    merchant_pop /= merchant_pop.sum()
    risky = rng.random(n_merchants) < 0.05
    # new accounts open during the period (first_day > 0); their first day is legitimate
    offset, first_day, _ = _card_holders(cfg)
    # personal rhythm: most shift their day by an hour or two, a few work nights
    shift = np.round(rng.normal(0.0, 1.0, cfg.users))
    shift = np.where(rng.random(cfg.users) < 0.04, 9.0, shift)
    return _World(n_merchants, merchant_pop, np.flatnonzero(risky), offset, first_day, shift)


Draws = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # user, ts, merchant, amount, channel


def _legitimate(cfg: SimConfig, rng: np.random.Generator, w: _World) -> Draws:
    """Everyday purchases at the user's own hours, mostly at their favourite merchants."""
    start_us = _start_us(cfg)
    end_us = start_us + cfg.days * US_PER_DAY
    user_start = start_us + w.first_day * US_PER_DAY
    active_days = cfg.days - w.first_day
    rate = rng.gamma(2.0, cfg.txns_per_user_day / 2.0, cfg.users)
    habit_mu = rng.normal(3.4, 0.6, cfg.users)  # log-amount mean, ~EUR 30
    w.habit_mean = np.exp(habit_mu + 0.8**2 / 2)  # mean of the user's lognormal amounts
    n_txn = rng.poisson(rate * active_days)
    user = np.repeat(np.arange(cfg.users), n_txn)
    n = user.size
    day = w.first_day[user] + (rng.random(n) * active_days[user]).astype(np.int64)
    local_hour = (rng.choice(24, n, p=HOUR_P) + w.shift[user]) % 24
    ts = _at_local_hour(start_us + day * US_PER_DAY, local_hour, w.offset[user], rng)
    w.favourites = rng.choice(w.n_merchants, (cfg.users, 8), p=w.merchant_pop)
    at_favourite = rng.random(n) < 0.9
    merchant = np.where(
        at_favourite,
        w.favourites[user, rng.integers(0, 8, n)],
        rng.choice(w.n_merchants, n, p=w.merchant_pop),
    )
    amount = np.exp(rng.normal(habit_mu[user], 0.8))
    # now and then a big legitimate purchase (furniture, a flight): 5-30x the habit
    big = rng.random(n) < 0.005
    amount = np.where(big, w.habit_mean[user] * rng.uniform(5.0, 30.0, n), amount)
    # legitimate shopping sprees: some transactions come in quick runs at familiar merchants
    spree = rng.random(n) < 0.04
    ts = np.where(spree, ts - ts % US_PER_HOUR + rng.integers(0, 15 * US_PER_MIN, n), ts)
    channel = rng.choice(len(CHANNELS), n, p=NORMAL_CHANNEL_P)
    legit = (ts >= user_start[user]) & (ts < end_us)
    user, ts, merchant, amount, channel = (
        a[legit] for a in (user, ts, merchant, amount, channel))
    return user, ts, merchant, amount, channel


def _fraud(cfg: SimConfig, rng: np.random.Generator, w: _World) -> Draws:
    """Fraud episodes at hours unusual for the victim: most while the card holder sleeps (their
    local night), the rest whenever the fraudster, anywhere in the world, is awake: never a
    fixed UTC window.  A new account's first day is its own: its card is not yet stolen, nor
    its login phished."""
    assert w.favourites is not None and w.habit_mean is not None  # noqa: S101 - drawn first
    start_us = _start_us(cfg)
    end_us = start_us + cfg.days * US_PER_DAY
    exposed_from = np.where(w.first_day > 0, w.first_day + 1, 0)
    exposed_days = np.clip(cfg.days - exposed_from, 0, None)
    n_ep = rng.poisson(cfg.fraud_episode_rate * exposed_days.sum())
    ep_user = rng.choice(cfg.users, n_ep, p=exposed_days / max(exposed_days.sum(), 1))
    ep_day_us = start_us + (exposed_from[ep_user] + (
        rng.random(n_ep) * exposed_days[ep_user]).astype(np.int64)) * US_PER_DAY
    asleep = rng.random(n_ep) < 0.6
    ep_local = np.where(asleep, rng.integers(1, 6, n_ep) + w.shift[ep_user],
                        rng.integers(0, 24, n_ep)) % 24
    ep_start = _at_local_hour(ep_day_us, ep_local, np.where(asleep, w.offset[ep_user], 0.0), rng)
    kind = rng.choice(3, n_ep, p=KIND_P)
    ep_len = np.select([kind == TESTING, kind == TAKEOVER],
                       [rng.integers(4, 12, n_ep), rng.integers(1, 4, n_ep)],
                       rng.integers(2, 6, n_ep))
    f_ep = np.repeat(np.arange(n_ep), ep_len)
    f_kind = kind[f_ep]
    f_pos = np.arange(f_ep.size) - np.repeat(np.cumsum(ep_len) - ep_len, ep_len)
    f_user = ep_user[f_ep]
    m = f_ep.size
    gap = np.where(f_kind == TESTING, 20_000_000, 5 * US_PER_MIN)  # ~20 s or ~5 min apart
    f_ts = ep_start[f_ep] + f_pos * gap + rng.integers(0, 10_000_000, m)
    f_merchant = _fraud_merchants(rng, w, f_user, f_kind, m)
    probing = (f_kind == TESTING) & (f_pos < ep_len[f_ep] - 2)
    f_amount = np.select(
        [probing, f_kind == TESTING, f_kind == TAKEOVER],
        [rng.uniform(2.0, 25.0, m),  # card testing: small probes ...
         w.habit_mean[f_user] * rng.uniform(3.0, 20.0, m),  # ... then the cash-out
         w.habit_mean[f_user] * rng.uniform(50.0, 200.0, m)],  # takeover: one huge payment
        w.habit_mean[f_user] * rng.uniform(2.0, 8.0, m),  # stolen card: shops and ATMs
    )
    f_channel = np.where(
        f_kind == STOLEN,
        rng.choice([0, 1, ATM], m, p=[0.45, 0.25, 0.3]),
        np.where(rng.random(m) < 0.9, ONLINE, rng.choice(4, m, p=NORMAL_CHANNEL_P)),
    )
    keep = (f_ts >= start_us + exposed_from[f_user] * US_PER_DAY) & (f_ts < end_us)
    return f_user[keep], f_ts[keep], f_merchant[keep], f_amount[keep], f_channel[keep]


def _fraud_merchants(rng: np.random.Generator, w: _World, f_user: np.ndarray,
                     f_kind: np.ndarray, m: int) -> np.ndarray:
    """Fraudsters shop where the victim does not (risky merchants, or any other), except that a
    taken-over account sometimes buys from the victim's own online shops."""
    assert w.favourites is not None  # noqa: S101 - drawn by `_legitimate`
    f_merchant = rng.choice(w.n_merchants, m, p=w.merchant_pop)
    for _ in range(20):
        familiar = (w.favourites[f_user] == f_merchant[:, None]).any(axis=1)
        if not familiar.any():
            break
        f_merchant[familiar] = rng.choice(w.n_merchants, int(familiar.sum()), p=w.merchant_pop)
    if w.risky_idx.size:
        to_risky = rng.random(m) < np.where(f_kind == TAKEOVER, 0.4, 0.3)
        f_merchant = np.where(to_risky, w.risky_idx[rng.integers(0, w.risky_idx.size, m)],
                              f_merchant)
    own_shop = (f_kind == TAKEOVER) & (rng.random(m) < 0.3)
    return np.where(own_shop, w.favourites[f_user, rng.integers(0, 8, m)], f_merchant)


def simulate(cfg: SimConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (transactions, labels), both sorted by event time."""
    rng = np.random.default_rng(cfg.seed)
    w = _world(cfg, rng)
    legit = _legitimate(cfg, rng, w)
    fraud_draws = _fraud(cfg, rng, w)
    user, ts, merchant, amount, channel = (
        np.concatenate([a, b]) for a, b in zip(legit, fraud_draws, strict=True))
    amount = np.round(amount, 2).clip(0.01, None)
    fraud = np.concatenate([np.zeros(legit[0].size, dtype=bool),
                            np.ones(fraud_draws[0].size, dtype=bool)])
    order = np.lexsort((merchant, user, ts))
    user, ts, merchant, amount = user[order], ts[order], merchant[order], amount[order]
    channel, fraud = channel[order], fraud[order]
    return _frames(cfg, rng, w, user, ts, merchant, amount, channel, fraud)


def _frames(cfg: SimConfig, rng: np.random.Generator, w: _World, user: np.ndarray,
            ts: np.ndarray, merchant: np.ndarray, amount: np.ndarray, channel: np.ndarray,
            fraud: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The transaction log and its labels (fraud is known 1 h-10 days later, the rest 3 days)."""
    total = ts.size
    txn_id = _ids("t", total)
    tx = pd.DataFrame(
        {
            "transaction_id": txn_id,
            "user_id": _ids("u", cfg.users)[user],
            "merchant_id": _ids("m", w.n_merchants)[merchant],
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


def write(tx: pd.DataFrame, labels: pd.DataFrame, root: Path,
          customer_records: pd.DataFrame | None = None) -> None:
    """Write the partitioned log, the labels and the customer records deterministically
    (replacing old output; without customer records, old ones are removed)."""
    out = transactions_dir(root)
    if out.exists():
        shutil.rmtree(out)
    customers_path(root).unlink(missing_ok=True)
    if customer_records is not None:
        root.mkdir(parents=True, exist_ok=True)
        ct = pa.Table.from_pandas(customer_records, preserve_index=False)
        pq.write_table(ct.replace_schema_metadata(None), customers_path(root))
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
    root = a.out or data_dir()
    t0 = time.perf_counter()
    cfg = SimConfig(a.users, a.days, a.seed, a.end, a.txns_per_user_day)
    tx, labels = simulate(cfg)
    t1 = time.perf_counter()
    write(tx, labels, root, customers(cfg))
    t2 = time.perf_counter()
    print(
        f"simulated {len(tx):,} transactions ({labels['is_fraud'].mean():.2%} fraud) for "
        f"{a.users:,} users over {a.days} days ending {a.end} in {t1 - t0:.1f}s; "
        f"written to {root} in {t2 - t1:.1f}s"
    )


if __name__ == "__main__":
    main()
