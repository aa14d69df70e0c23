"""What `python -m streaming.produce` sends: the simulated log in order, or live traffic.

`log_events` reads the day-partitioned log under `$FRAUD_DATA_DIR/transactions` in event-time
order with its original timestamps.

`live_events` generates live traffic, each event stamped when it is generated (sent).  Its
legitimate traffic comes from the bank's own card holders when the data directory has them
(`customers.parquet` and the log; see `streaming.population`, loaded once before the clock
starts): real user ids, the next shopper drawn in proportion to how much they shop at this hour
of their local day, mostly at their favourite merchants, amounts and channels as in their own
history.  A holder pays again in one run only after `COOL_DOWN_S` (15 min) while the rate allows
it, about 1 event/s per 900 holders (2/s for the demo's 2,000): card holders pay a couple of
times a day, and one who pays again within a minute or two looks like card testing to the
velocity features, which send such purchases to review or decline.  Without a population it
invents never-seen accounts `live-u000123` at synthetic merchants: accounts without a profile,
which the model reviews far more often than the card holders it knows.  A `fraud_share` of the
events come in card-testing bursts against a victim at a merchant new to them (small online
payments, then a cash-out of 300-2,000 EUR).  Given the seed and the clock, every choice is
fixed.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from feature_repo.contract import TransactionEvent
from streaming.population import CHANNELS, Population

_LOG_COLUMNS = [
    "transaction_id", "user_id", "merchant_id", "amount", "currency", "channel", "event_timestamp"
]
_CHANNEL_WEIGHTS = (0.5, 0.3, 0.17, 0.03)


def log_events(directory: Path) -> Iterator[TransactionEvent]:
    """Events of the day-partitioned log (`date=YYYY-MM-DD/*.parquet`) in event-time order."""
    files = sorted(directory.glob("*/*.parquet"))
    if not files:
        raise FileNotFoundError(f"no transaction log under {directory} (run `make simulate`)")
    for path in files:  # day partitions sort chronologically; rows are sorted within a day
        table = pq.read_table(path, columns=_LOG_COLUMNS).sort_by("event_timestamp")
        for batch in table.to_batches(10_000):
            for rec in batch.to_pylist():
                yield TransactionEvent.model_validate(rec)


def _now() -> datetime:
    return datetime.now(UTC)


def live_events(
    n: int, users: int, merchants: int, fraud_share: float, seed: int, id_prefix: str,
    population: Population | None = None, clock: Callable[[], datetime] = _now,
) -> Iterator[TransactionEvent]:
    """`n` random events stamped with `clock()` at the moment each is generated.

    With a `population` (the bank's card holders, `streaming.population`), legitimate events
    are its holders' own habits: the next shopper drawn in proportion to how much they shop at
    this hour of their local day, mostly at their favourite merchants, an amount from their own
    log-normal, their channel mix (`users` and `merchants` are then unused).  Without one,
    `users` synthetic never-seen accounts `live-u000123` shop at `merchants` synthetic
    merchants: such accounts have no profile, and the model reviews them far more often.

    Fraud (`fraud_share` of the events, in card-testing bursts) hits a victim at a merchant new
    to them: small online payments, then a cash-out of 300-2,000 EUR.
    """
    rng = random.Random(seed)
    if population is None:
        yield from _synthetic(n, users, merchants, fraud_share, rng, id_prefix, clock)
        return
    holders = population.holders
    last_paid: dict[int, float] = {}  # holder index -> clock seconds of their last event here
    burst: list[tuple[str, str, float, str]] = []  # pending (user, merchant, amount, channel)
    for i in range(n):
        now = clock()
        t = now.timestamp()
        if not burst and rng.random() < fraud_share / _MEAN_BURST:
            k = rng.randrange(len(holders))
            last_paid[k] = t  # the holder's own next purchase waits a cool-down too
            victim = holders[k]
            burst = _burst(rng, victim.user_id, _new_merchant(rng, population, victim.known))
        if burst:
            user, merchant, amount, channel = burst.pop(0)
        else:
            h = holders[_next_shopper(rng, population.shopper_weights(now), t, last_paid)]
            user = h.user_id
            if rng.random() < _AT_FAVOURITE:
                merchant = rng.choices(h.favourites, cum_weights=h.favourite_cum)[0]
            else:
                merchant = rng.choices(population.merchants, cum_weights=population.merchant_cum)[0]
            amount = round(min(rng.lognormvariate(h.log_mu, h.log_sigma), 5_000.0), 2) or 0.01
            channel = rng.choices(CHANNELS, cum_weights=h.channel_cum)[0]
        yield _event(f"{id_prefix}-{i:09d}", user, merchant, amount, channel, now)


def _next_shopper(rng: random.Random, cum_weights: list[float], t: float,
                  last_paid: dict[int, float]) -> int:
    """Index of the next holder to pay at clock second `t`: drawn by `cum_weights`, redrawn
    (at most `_DRAWS` times) while the one drawn paid in this run less than `COOL_DOWN_S` ago;
    if all draws did, the one who paid longest ago."""
    top = cum_weights[-1]
    best, best_t = -1, math.inf
    for _ in range(_DRAWS):
        k = min(bisect.bisect(cum_weights, rng.random() * top), len(cum_weights) - 1)
        paid = last_paid.get(k, -math.inf)
        if paid < best_t:
            best, best_t = k, paid
        if t - paid >= COOL_DOWN_S:
            break
    last_paid[best] = t
    return best


def _synthetic(n: int, users: int, merchants: int, fraud_share: float, rng: random.Random,
               id_prefix: str, clock: Callable[[], datetime]) -> Iterator[TransactionEvent]:
    """Never-seen users `live-u000123` at synthetic merchants `live-m00012`."""
    user_ids = [f"live-u{i:06d}" for i in range(users)]
    merchant_ids = [f"live-m{i:05d}" for i in range(merchants)]
    favourites = {u: rng.sample(merchant_ids, min(5, merchants)) for u in user_ids}
    burst: list[tuple[str, str, float, str]] = []
    for i in range(n):
        if not burst and rng.random() < fraud_share / _MEAN_BURST:
            victim = rng.choice(user_ids)
            burst = _burst(rng, victim, f"live-mx{rng.randrange(50):02d}")  # nobody else's shop
        if burst:
            user, merchant, amount, channel = burst.pop(0)
        else:
            user = rng.choice(user_ids)
            merchant = rng.choice(favourites[user]) if rng.random() < _AT_FAVOURITE else (
                rng.choice(merchant_ids))
            amount = round(min(rng.lognormvariate(3.4, 0.8), 5_000.0), 2) or 0.01
            channel = rng.choices(CHANNELS, _CHANNEL_WEIGHTS)[0]
        yield _event(f"{id_prefix}-{i:09d}", user, merchant, amount, channel, clock())


# A bank holder pays again in one run only after this long, as long as the rate allows
# (len(population) / COOL_DOWN_S events/s): card holders pay about 1.5 times a day, and a
# second payment within minutes is what the velocity features (rightly) find suspicious.
COOL_DOWN_S = 900.0
_DRAWS = 10  # draws per event looking for a holder past the cool-down
_MEAN_BURST = 6.0  # events per card-testing burst, on average
_AT_FAVOURITE = 0.9  # share of legitimate purchases at one of the user's favourite merchants


def _burst(rng: random.Random, victim: str, shop: str) -> list[tuple[str, str, float, str]]:
    """A card-testing burst: 2-8 small online payments at `shop`, then a cash-out."""
    k = rng.randint(3, 9)
    burst = [(victim, shop, round(rng.uniform(1, 20), 2), "online") for _ in range(k - 1)]
    burst.append((victim, shop, round(rng.uniform(300, 2000), 2), "online"))
    return burst


def _new_merchant(rng: random.Random, population: Population, known: frozenset[str]) -> str:
    """A bank merchant (by popularity) the victim has not used, else a fraud-only one."""
    for _ in range(20):
        m = rng.choices(population.merchants, cum_weights=population.merchant_cum)[0]
        if m not in known:
            return m
    return f"live-mx{rng.randrange(50):02d}"


def _event(txn_id: str, user: str, merchant: str, amount: float, channel: str,
           ts: datetime) -> TransactionEvent:
    return TransactionEvent(
        transaction_id=txn_id, user_id=user, merchant_id=merchant, amount=amount,
        currency="EUR", channel=channel, event_timestamp=ts,  # type: ignore[arg-type]
    )
