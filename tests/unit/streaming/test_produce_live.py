"""`python -m streaming.produce live` draws its legitimate traffic from the bank's own card holders
when the data directory has them: their ids, merchants from their own history, their hours in
their own time zone; never-seen synthetic accounts otherwise.  Same seed and clock, same events.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_repo.contract import TransactionEvent
from feature_repo.paths import customers_path, transactions_dir
from streaming.population import MIN_HISTORY, Population, load_population
from streaming.produce import choose_population, main
from streaming.traffic import COOL_DOWN_S, live_events
from training.simulate import SimConfig, customers, simulate, write

END = date(2026, 11, 22)  # the simulated log ends here (UTC midnight)
NOON = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _clock(start: datetime, step_s: float = 1.0) -> Callable[[], datetime]:
    ticks: Iterator[int] = itertools.count()
    return lambda: start + timedelta(seconds=step_s * next(ticks))


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A small simulated bank: customer records, log and labels, as `make simulate` writes."""
    root = tmp_path_factory.mktemp("bank")
    cfg = SimConfig(users=120, days=35, seed=3, end=END)
    tx, labels = simulate(cfg)
    write(tx, labels, root, customers(cfg))
    legit = tx[~tx["transaction_id"].isin(labels.loc[labels["is_fraud"] == 1, "transaction_id"])]
    return root, legit


def test_live_uses_the_bank_population_when_the_data_exists(
    bank: tuple[Path, pd.DataFrame],
) -> None:
    root, legit = bank
    pop = choose_population("auto", root, None, seed=1)
    assert pop is not None
    last = legit["event_timestamp"].max()  # the window: the last 30 days of the log
    recent = legit[legit["event_timestamp"] > last - pd.Timedelta(days=30)]
    counts = recent["user_id"].value_counts()
    assert {h.user_id for h in pop.holders} == set(counts.index[counts >= MIN_HISTORY])
    history = recent.groupby("user_id")["merchant_id"].agg(set).to_dict()
    for h in pop.holders:  # favourites: the holder's most visited merchants, most visited first
        visits = recent.loc[recent["user_id"] == h.user_id, "merchant_id"].value_counts()
        assert set(h.favourites) <= history[h.user_id]
        assert visits[h.favourites[0]] == visits.iloc[0]

    events = list(live_events(400, 0, 0, 0.0, 5, "t", pop, clock=_clock(NOON, 60)))
    assert {e.user_id for e in events} <= set(history), "real card holder ids only"
    own = sum(e.merchant_id in history[e.user_id] for e in events)
    assert own >= 0.85 * len(events), f"only {own} of {len(events)} at the user's own merchants"
    assert {e.channel for e in events} <= {"card_present", "contactless", "online", "atm"}


def test_without_data_or_when_asked_the_accounts_are_synthetic(
    bank: tuple[Path, pd.DataFrame], tmp_path: Path,
) -> None:
    assert choose_population("auto", tmp_path, None, seed=1) is None
    assert choose_population("synthetic", bank[0], None, seed=1) is None
    with pytest.raises(FileNotFoundError):
        choose_population("bank", tmp_path, None, seed=1)
    events = list(live_events(50, 10, 20, 0.0, 5, "t"))
    assert all(e.user_id.startswith("live-u") and e.merchant_id.startswith("live-m")
               for e in events)


def test_live_help_says_never_seen_accounts_review_more(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["live", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--population {auto,bank,synthetic}" in text
    assert "never-seen accounts, which the model reviews far more often" in text


def test_a_sample_of_the_bank_with_users(bank: tuple[Path, pd.DataFrame]) -> None:
    full = choose_population("bank", bank[0], None, seed=1)
    some = choose_population("bank", bank[0], 25, seed=1)
    assert full is not None and some is not None and len(some) == 25
    assert {h.user_id for h in some.holders} < {h.user_id for h in full.holders}
    assert some.holders == choose_population("bank", bank[0], 25, seed=1).holders  # type: ignore[union-attr]
    events = list(live_events(100, 0, 0, 0.0, 5, "t", some, clock=_clock(NOON, 60)))
    assert {e.user_id for e in events} <= {h.user_id for h in some.holders}


def _two_zone_bank(root: Path, per_zone: int = 30) -> None:
    """Card holders in Tokyo (UTC+9) and New York (UTC-5) who only ever shop 10:00-11:00
    local time."""
    rows = []
    for zone, offset in [("tokyo", 9.0), ("nyc", -5.0)]:
        for k, day in itertools.product(range(per_zone), range(20)):
            utc = datetime(2026, 11, 1, 10, 30, tzinfo=UTC) + timedelta(days=day, hours=-offset)
            rows.append({"transaction_id": f"{zone}{k}-{day}", "user_id": f"u-{zone}-{k:02d}",
                         "merchant_id": f"m-{zone}", "amount": 20.0 + day, "currency": "EUR",
                         "channel": "card_present", "event_timestamp": utc})
    tx = pd.DataFrame(rows).sort_values("event_timestamp")
    tx["event_timestamp"] = tx["event_timestamp"].astype("datetime64[us, UTC]")
    for day, part in tx.groupby(tx["event_timestamp"].dt.strftime("%Y-%m-%d")):
        out = transactions_dir(root) / f"date={day}"
        out.mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), out / "part-0.parquet")
    users = sorted(tx["user_id"].unique())
    offsets = [9.0 if "tokyo" in u else -5.0 for u in users]
    pq.write_table(pa.table({"user_id": users, "home_utc_offset_hours": offsets}),
                   customers_path(root))


def test_shoppers_are_drawn_by_the_hour_of_their_own_local_day(tmp_path: Path) -> None:
    _two_zone_bank(tmp_path)
    pop = load_population(tmp_path)
    tokyo = [i for i, h in enumerate(pop.holders) if "tokyo" in h.user_id]
    for utc_hour, zone in [(1, "tokyo"), (15, "nyc")]:  # 10:xx in Tokyo, then in New York
        when = datetime(2026, 11, 25, utc_hour, 30, tzinfo=UTC)
        cum = pop.shopper_weights(when)
        rate = [b - a for a, b in itertools.pairwise([0.0, *cum])]
        share = sum(rate[i] for i in tokyo) / cum[-1]
        assert (share if zone == "tokyo" else 1 - share) > 0.9, (zone, share)
        events = list(live_events(20, 0, 0, 0.0, 9, "t", pop, clock=_clock(when, 60)))
        local = sum(zone in e.user_id for e in events)
        assert local >= 18, f"{local} of 20 purchases at 10:xx in {zone} by its card holders"


def test_same_seed_and_clock_same_events(bank: tuple[Path, pd.DataFrame]) -> None:
    pop = load_population(bank[0])

    def run(seed: int) -> list[TransactionEvent]:
        return list(live_events(300, 0, 0, 0.2, seed, "t", pop, clock=_clock(NOON)))

    assert run(4) == run(4)
    assert [e.user_id for e in run(4)] != [e.user_id for e in run(5)]
    assert load_population(bank[0]).holders == pop.holders  # loading is deterministic too


def test_holders_do_not_pay_twice_within_the_cool_down_while_the_rate_allows(
    bank: tuple[Path, pd.DataFrame],
) -> None:
    pop: Population = load_population(bank[0])
    n = len(pop) // 4  # a quarter of the holders, all within one cool-down
    events = list(live_events(n, 0, 0, 0.0, 5, "t", pop, clock=_clock(NOON, COOL_DOWN_S / n)))
    paid = collections.Counter(e.user_id for e in events)
    assert paid.most_common(1)[0][1] == 1, paid.most_common(3)


def test_fraud_bursts_hit_a_known_victim_at_a_merchant_new_to_them(
    bank: tuple[Path, pd.DataFrame],
) -> None:
    pop = load_population(bank[0])
    known = {h.user_id: h.known for h in pop.holders}
    events = list(live_events(600, 0, 0, 0.3, 2, "t", pop, clock=_clock(NOON)))
    bursts = []
    run = [events[0]]
    for e in events[1:]:  # a burst: consecutive online events of one user at one merchant
        if (e.user_id, e.merchant_id) == (run[-1].user_id, run[-1].merchant_id):
            run.append(e)
            continue
        if len(run) >= 3 and run[-1].amount >= 300:
            bursts.append(run)
        run = [e]
    assert len(bursts) >= 10, len(bursts)
    for b in bursts:
        assert b[0].user_id in known and b[0].merchant_id not in known[b[0].user_id]
        assert all(e.channel == "online" for e in b)
        assert all(e.amount <= 20 for e in b[:-1]) and 300 <= b[-1].amount <= 2000
