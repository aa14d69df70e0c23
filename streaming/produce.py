"""Put transactions on the `transactions` topic: replay the simulated log, or simulate live.

    python -m streaming.produce replay [--speedup X] [--limit N] [--data-dir DIR]
    python -m streaming.produce live --rate R --duration S [--population auto|bank|synthetic]
                                     [--users N] [--fraud-share F] [--seed N]
    python -m streaming.produce schema   # the JSON schema of an event (docs/events.md)

`replay` sends the day-partitioned log under `$FRAUD_DATA_DIR/transactions` in event-time
order with its original timestamps, paced at X times real speed (X=0: as fast as possible).

`live` sends `rate` events per second for `duration` seconds, stamped with the current time:
the bank's own card holders shopping as they do (`--population auto|bank`), or never-seen
synthetic accounts (`--population synthetic`), with a `--fraud-share` in card-testing bursts
(what is sent is `streaming.traffic`'s; this module paces and sends it).  `--users N` keeps a
random N card holders; above about 1 event/s per 900 holders they pay again within their
15-min cool-down, which the velocity features flag (a warning says so).  `--seed` fixes every
choice, given the clock (default: a new seed each run, printed); transaction ids are prefixed
with `--id-prefix`, by default the start time, so two runs never collide.

Both print a progress line every `--progress-s` seconds and exit with status 1 if any event was
not acknowledged by the broker by the end of `--flush-timeout-s` (see TransactionProducer).

Pacing wakes up at most every `--tick-ms` (default 5, the producer's own `linger.ms`) and sends
every event due by then, each stamped when it is sent: waking up for each event (every 0.2 ms at
5,000/s) cost a whole core here, the 5 ms tick about a quarter of one.

The clock starts once the producer is ready (`TransactionProducer.wait_ready`, at most
`--ready-timeout-s`): a new idempotent producer holds its first records about 0.5 s until the
broker assigns it a producer id, which stamped the first events of every run half a second
before they could leave.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from feature_repo.config import apply_env_defaults, data_dir
from feature_repo.contract import TransactionEvent
from feature_repo.paths import transactions_dir
from streaming.population import Population, has_population, load_population
from streaming.producer import TransactionProducer
from streaming.traffic import COOL_DOWN_S, live_events, log_events


class _Progress:
    """Prints a progress line at most every `every_s` seconds, and a final summary."""

    def __init__(self, label: str, producer: TransactionProducer, every_s: float) -> None:
        self.label = label
        self.producer = producer
        self.every_s = every_s
        self.start = self.last = time.monotonic()

    def tick(self, extra: str = "") -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now, extra)

    def done(self, failures: int) -> None:
        p = self.producer
        dt = max(time.monotonic() - self.start, 1e-9)
        print(
            f"{self.label}: done, {p.sent:,} sent, {p.delivered:,} delivered, {failures:,} not "
            f"delivered in {dt:.1f}s ({p.delivered / dt:,.0f} events/s) to {p.topic} "
            f"at {p.bootstrap}",
            flush=True,
        )
        for err in p.errors:
            print(f"{self.label}: error: {err}", file=sys.stderr)

    def _line(self, now: float, extra: str) -> None:
        p = self.producer
        rate = p.sent / max(now - self.start, 1e-9)
        print(
            f"{self.label}: {p.sent:,} sent, {p.delivered:,} delivered, {p.failed:,} failed, "
            f"{rate:,.0f} events/s{extra}",
            flush=True,
        )


SEND_TICK_S = 0.005


def _wait_until(target: float, producer: TransactionProducer, progress: _Progress,
                tick_s: float = SEND_TICK_S) -> None:
    """Sleep until monotonic time `target`, serving delivery reports and progress lines.

    A target less than `tick_s` away is slept to `tick_s` (the events due meanwhile are then
    sent together), so the sender wakes up at most once per tick.
    """
    now = time.monotonic()
    if target <= now:
        return
    target = max(target, now + tick_s)
    while (left := target - time.monotonic()) > 0:
        producer.poll(min(left, 0.25))
        progress.tick()


def replay(
    producer: TransactionProducer,
    events: Iterator[TransactionEvent],
    speedup: float,
    limit: int | None,
    progress: _Progress,
    tick_s: float = SEND_TICK_S,
) -> None:
    """Send `events` paced by their event times at `speedup` x real speed (0 = unpaced)."""
    origin: tuple[float, datetime] | None = None
    for n, event in enumerate(events):
        if limit is not None and n >= limit:
            break
        if speedup > 0:
            if origin is None:
                origin = (time.monotonic(), event.event_timestamp)
            offset = (event.event_timestamp - origin[1]).total_seconds() / speedup
            _wait_until(origin[0] + offset, producer, progress, tick_s)
        producer.send(event)
        progress.tick(f", event time {event.event_timestamp:%Y-%m-%d %H:%M:%S}")


def live(
    producer: TransactionProducer,
    events: Iterator[TransactionEvent],
    rate: float,
    progress: _Progress,
    tick_s: float = SEND_TICK_S,
) -> None:
    """Send the i-th event at start + i/rate seconds (catching up without sleeping if late;
    events due within one `tick_s` go together).

    Each event is generated only when it is sent, so its `event_timestamp` is its send time.
    """
    start = time.monotonic()
    for i in itertools.count():
        _wait_until(start + i / rate, producer, progress, tick_s)
        event = next(events, None)
        if event is None:
            return
        producer.send(event)
        progress.tick()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streaming.produce", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bootstrap", default=None, help="default $KAFKA_BOOTSTRAP_SERVERS")
    common.add_argument("--topic", default=None, help="default: transactions")
    common.add_argument("--progress-s", type=float, default=5.0)
    common.add_argument("--flush-timeout-s", type=float, default=60.0)
    common.add_argument("--ready-timeout-s", type=float, default=10.0,
                        help="wait this long at most for the producer to be ready before the "
                             "clock starts (connected, producer id assigned)")
    common.add_argument("--tick-ms", type=float, default=SEND_TICK_S * 1000,
                        help="pacing granularity: events due within a tick are sent together")

    r = sub.add_parser("replay", parents=[common], help="replay the simulated log")
    r.add_argument("--speedup", type=float, default=0.0, help="x real time; 0 = unpaced")
    r.add_argument("--limit", type=int, default=None, help="stop after N events")
    r.add_argument("--data-dir", type=Path, default=None, help="default $FRAUD_DATA_DIR")

    lv = sub.add_parser("live", parents=[common], help="simulate live traffic, timestamped now")
    lv.add_argument("--rate", type=float, default=100.0, help="events per second")
    lv.add_argument("--duration", type=float, default=60.0, help="seconds")
    lv.add_argument("--population", choices=("auto", "bank", "synthetic"), default="auto",
                    help="bank: the card holders of the data directory (customers.parquet and "
                         "the log); synthetic: never-seen accounts, which the model reviews "
                         "far more often; auto (default): bank when the data is there")
    lv.add_argument("--data-dir", type=Path, default=None, help="default $FRAUD_DATA_DIR")
    lv.add_argument("--users", type=int, default=None,
                    help="synthetic accounts (default 1000), or a random sample of this many "
                         "bank card holders (default all)")
    lv.add_argument("--merchants", type=int, default=200, help="synthetic merchants")
    lv.add_argument("--fraud-share", type=float, default=0.01, help="approximate, 0..1")
    lv.add_argument("--seed", type=int, default=None,
                    help="fixes every choice, given the clock (default: a new one each run, "
                         "printed, so a restarted producer does not replay the same holders)")
    lv.add_argument("--id-prefix", default=None, help="default lv<start time in ms>")

    sub.add_parser("schema", help="print the JSON schema of a transaction event")
    return p


def choose_population(choice: str, root: Path, users: int | None, seed: int) -> Population | None:
    """The bank population for `--population` (None: synthetic); loaded before the clock
    starts. Says on stderr which one is used (stdout starts with the progress lines)."""
    why = "--population synthetic"
    if choice == "auto" and not has_population(root):
        why = f"no customer records and log in {root}"
    elif choice != "synthetic":
        try:
            population = load_population(root)
        except ValueError as e:
            if choice == "bank":
                raise
            why = str(e)
        else:
            if users is not None:
                population = population.subset(users, seed)
            print(f"live: bank population: {population.source}", file=sys.stderr)
            return population
    print(f"live: synthetic never-seen accounts ({why}): the model reviews these far more "
          "often than card holders it knows", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.command == "schema":
        print(json.dumps(TransactionEvent.model_json_schema(), indent=2))
        return 0
    if a.tick_ms < 0:
        print(f"{a.command}: need --tick-ms >= 0", file=sys.stderr)
        return 2
    if a.command == "live" and (a.rate <= 0 or a.duration < 0 or (a.users or 1) < 1
                                or a.merchants < 5 or not 0 <= a.fraud_share <= 1):
        print("live: need --rate > 0, --duration >= 0, --users >= 1, --merchants >= 5 and "
              "0 <= --fraud-share <= 1", file=sys.stderr)
        return 2
    apply_env_defaults()
    population = None
    if a.command == "live":
        if a.seed is None:
            a.seed = random.SystemRandom().randrange(2**31)
        print(f"live: --seed {a.seed}", file=sys.stderr)
        try:
            population = choose_population(a.population, a.data_dir or data_dir(), a.users, a.seed)
        except (FileNotFoundError, ValueError) as e:
            print(f"live: --population bank: {e}", file=sys.stderr)
            return 2
        if population is not None and a.rate * min(a.duration, COOL_DOWN_S) > len(population):
            print(f"live: at {a.rate:g} events/s the {len(population):,} holders pay about "
                  f"every {len(population) / a.rate:,.0f} s, not once per "
                  f"{COOL_DOWN_S / 60:.0f} min: the velocity features will flag many purchases "
                  f"(up to {len(population) / COOL_DOWN_S:.2g} events/s keep the cool-down)",
                  file=sys.stderr)
    kwargs = {"topic": a.topic} if a.topic else {}
    producer = TransactionProducer(a.bootstrap, track_ready=True, **kwargs)
    if not producer.wait_ready(a.ready_timeout_s):
        print(f"{a.command}: producer not ready after {a.ready_timeout_s:.0f} s (broker "
              f"{producer.bootstrap}); sending anyway", file=sys.stderr)
    progress = _Progress(a.command, producer, a.progress_s)
    try:
        if a.command == "replay":
            events = log_events(transactions_dir(a.data_dir or data_dir()))
            replay(producer, events, a.speedup, a.limit, progress, a.tick_ms / 1000)
        else:
            prefix = a.id_prefix or f"lv{int(time.time() * 1000)}"
            n = int(a.rate * a.duration)
            gen = live_events(n, a.users or 1000, a.merchants, a.fraud_share, a.seed, prefix,
                              population)
            live(producer, gen, a.rate, progress, a.tick_ms / 1000)
    except KeyboardInterrupt:
        print(f"{a.command}: interrupted, flushing", file=sys.stderr)
    failures = producer.flush(a.flush_timeout_s)
    progress.done(failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
