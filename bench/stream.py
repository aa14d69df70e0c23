"""Stream: sustained events/s through the feature dataflow, freshness, and stock `store.push()`.

*Ours*: `streaming.flow.build_flow` as `streaming.features.live_flow` wires it, with the live
Kafka input (`streaming.features.kafka_source`) and the real `VelocitySink` (online writes in
Feast's Redis layout into Redis database `BENCH_STREAM_REDIS_DB`, offline history parquet in a
scratch directory), the Kafka dead-letter sink, one worker, recovery snapshots every 2 s: what
`python -m streaming.features` runs.  *Stock*: the same events, parsed and turned into the same
velocity rows, written with `FeatureStore.push()` one event at a time (online only).

1. Throughput: N events are produced into a fresh topic (4 partitions) of a private Tansu
   broker first; the dataflow (`tail=False`) then consumes them to the end and exits, once as
   one process and once as a cluster of 2 processes (`-i k -a ...`, what
   `python -m streaming.features --processes 2` runs), each run from an empty online store.
   The event counters are polled every 0.1 s (summed over the processes); the sustained rate
   is taken between 10% and 90% of the events (start-up and the last partial batch excluded);
   CPU per event is the CPU time of all processes over the whole run / events.
2. Freshness: a worker tails another topic while `python -m streaming.produce live` sends
   events open loop at a fixed rate; the worker's `fraud_stream_freshness_seconds` histogram
   (producer timestamp -> online write acknowledged) is read before and after, and its
   quantiles are interpolated within the histogram's buckets.
3. Stock: `store.push()` per event on a bounded sample, unpaced (events/s), and paced at the
   same arrival rate as 2. (freshness = push done - scheduled arrival; no Kafka in this path).

4. Cost: the worker's CPU per event over the throughput run, as a multiple of a parse-only
   pass (the same pre-loaded events through `streaming.events.parse` alone, in-process, process
   CPU, median of 3): a ratio that holds across host speeds.  First event: from the tailing
   worker's /ready answering 200 to the online row of one event sent at that moment.

`python -m bench.stream worker|push|parse ...` are the child processes (not meant to be run by
hand).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench import profile
from bench.config import Sizes, get_settings, scratch_dir
from bench.data import scoring_dataset
from bench.procs import (
    BenchError,
    Child,
    free_port,
    log_tail,
    python,
    run_capture,
    run_json,
    running,
)
from bench.report import Measure, Section, Target
from feature_repo.heap import settle_heap
from streaming.cluster import free_ports

THROUGHPUT_TARGET = 20_000.0  # events/s, one worker
CPU_PER_EVENT_TARGET_US = 30.0  # one worker, CPU of the whole process / events
FRESHNESS_P99_TARGET_MS = 250.0  # at 5,000 events/s (the full size)
FRESHNESS_P50_TARGET_MS = 50.0  # same run
FIRST_EVENT_TARGET_S = 5.0  # first event served (online row written) after /ready answers 200
PRELOAD_SEED = 7  # of `live_events` for the pre-loaded topic (the parse-only pass regenerates it)
THRU_TOPIC, FRESH_TOPIC, DLQ_TOPIC = "bench.transactions", "bench.fresh", "bench.dlq"
PUSH_SOURCE = "user_velocity_push_source"


# --- parent: orchestration -----------------------------------------------------------------

def run(sizes: Sizes, section: Section) -> None:
    import redis

    from devenv.broker import TansuBroker
    from scoring.topics import ensure_topics

    s = get_settings()
    log_dir = s.run_dir / "logs"
    dataset = scoring_dataset()  # only its Feast registry is used
    redis_url = dataset.redis_url.rsplit("/", 1)[0] + f"/{s.stream_redis_db}"
    env = dataset.env(REDIS_URL=redis_url)
    section.ours_label = ("streaming.flow.build_flow as get_flow wires it: Kafka input -> "
                          "state (seeded from the online store) -> VelocitySink (online write "
                          "to Redis in Feast's layout + offline Delta history) + Kafka DLQ, "
                          "1 worker")
    section.stock_label = "FeatureStore.push() per event, online (same parsed events and rows)"
    rdb = redis.Redis.from_url(redis_url)
    rdb.flushdb()
    scratch = scratch_dir("stream-")
    try:
        with TansuBroker(log_path=log_dir / "tansu.log") as broker:
            ensure_topics(broker.bootstrap, partitions={THRU_TOPIC: 4, FRESH_TOPIC: 4,
                                                        DLQ_TOPIC: 1})
            pre = _preload(broker.bootstrap, THRU_TOPIC, sizes.stream_events, sizes.stream_users)
            thru = _throughput(broker.bootstrap, sizes, env, scratch, log_dir, pre, 1)
            parse_only = _parse_only(pre, env, log_dir)
            rdb.flushdb()  # the 2-process run starts from an empty online store too
            thru2 = _throughput(broker.bootstrap, sizes, env, scratch, log_dir, pre, 2)
            rdb.flushdb()
            fresh = _freshness(broker.bootstrap, sizes, env, scratch, log_dir)
            push = run_json("stock push", python(
                "-m", "bench.stream", "push", "--events", str(sizes.push_events), "--rate",
                str(sizes.fresh_rate), "--window", str(sizes.push_window_s), "--users",
                str(sizes.stream_users)), env, log_dir / "stream-push.log", timeout_s=900)
            section.details = {"throughput": thru, "throughput_2_processes": thru2,
                               "parse_only": parse_only, "freshness": fresh, "stock_push": push}
            _measures(section, sizes, thru, fresh, push)
            _cost_measures(section, thru, thru2, parse_only)
            _process_measures(section, thru, thru2, push)
            if section.missed():
                section.profiles["ours worker, throughput run again on the same topic (py-spy)"] \
                    = _profile(broker.bootstrap, env, scratch, log_dir)
    finally:
        rdb.flushdb()
        rdb.close()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    section.notes.insert(0, f"Registry: {dataset.describe()}; online writes to {redis_url} "
                            "(flushed before and after); a private Tansu broker.")


def _preload(bootstrap: str, topic: str, n: int, users: int) -> dict[str, Any]:
    from streaming.producer import TransactionProducer
    from streaming.traffic import live_events

    t0 = time.perf_counter()
    producer = TransactionProducer(bootstrap, topic=topic, linger_ms=20)
    prefix = f"pre{int(time.time())}"
    for e in live_events(n, users, max(users // 10, 5), 0.01, PRELOAD_SEED, prefix):
        producer.send(e)
    failures = producer.flush(120)
    if failures:
        raise BenchError(f"pre-loading {topic}: {failures} of {n} events not delivered")
    return {"events": n, "users": users, "id_prefix": prefix,
            "seconds": time.perf_counter() - t0}


def _parse_only(pre: dict[str, Any], env: dict[str, str], log_dir: Path) -> dict[str, Any]:
    """CPU per event of the contract parse alone over the pre-loaded events (a child process
    regenerates the same events, same seed and ids, and parses their bytes in-process)."""
    return run_json("parse-only pass", python(
        "-m", "bench.stream", "parse", "--events", str(pre["events"]), "--users",
        str(pre["users"]), "--id-prefix", pre["id_prefix"]), env,
        log_dir / "stream-parse.log", timeout_s=600)


def _worker_argv(bootstrap: str, topic: str, scratch: Path, name: str, port: int,
                 tail: bool, process_id: int = 0, addresses: str = "") -> list[str]:
    cluster = ["--process-id", str(process_id), "--addresses", addresses] if addresses else []
    return python("-m", "bench.stream", "worker", "--bootstrap", bootstrap, "--topic", topic,
                  "--dlq-topic", DLQ_TOPIC, "--history", str(scratch / f"history-{name}"),
                  "--recovery", str(scratch / f"recovery-{name}"), "--metrics-port", str(port),
                  *(["--tail"] if tail else []), *cluster)


def _scrape(port: int) -> dict[str, Any] | None:
    """Event count and freshness buckets from the worker's /metrics (None if not up)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
    except httpx.HTTPError:
        return None
    out: dict[str, Any] = {"events": 0.0, "buckets": {}, "rows_online": 0.0, "dlq": 0.0}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "fraud_stream_events_total":
                out["events"] += smp.value
            elif smp.name == "fraud_stream_freshness_seconds_bucket":
                out["buckets"][float(smp.labels["le"])] = smp.value
            elif smp.name == "fraud_stream_rows_written_total" and smp.labels.get(
                    "store") == "online":
                out["rows_online"] = smp.value
            elif smp.name == "fraud_stream_dlq_total":
                out["dlq"] += smp.value
    return out


def _throughput(bootstrap: str, sizes: Sizes, env: dict[str, str], scratch: Path,
                log_dir: Path, pre: dict[str, Any], processes: int) -> dict[str, Any]:
    """The pre-loaded topic read to its end by `processes` dataflow processes (one cluster)."""
    n = sizes.stream_events
    # each process's metrics port and cluster address: ports the kernel handed out (a port
    # next to one may be another connection's, and its bind then fails)
    ports = free_ports(2 * processes) if processes > 1 else free_ports(1)
    addresses = ";".join(f"127.0.0.1:{p}" for p in ports[processes:])
    ports = ports[:processes]
    name = "thru" if processes == 1 else f"thru{processes}"
    samples: list[tuple[float, float, float]] = []  # (time, events, online rows)
    # start-up (imports, the cluster) on a busy machine, then even 1,000 events/s finishes
    timeout = get_settings().server_start_timeout_s + n / 1000
    logs = [log_dir / f"stream-worker{'' if processes == 1 else f'-{processes}p-{k}'}.log"
            for k in range(processes)]
    with ExitStack() as stack:
        children = [stack.enter_context(running(
            f"stream worker {k + 1}/{processes}",
            _worker_argv(bootstrap, THRU_TOPIC, scratch, name, ports[k], tail=False,
                         process_id=k, addresses=addresses), env, logs[k]))
            for k in range(processes)]
        t0 = time.perf_counter()
        while any(c.alive() for c in children) and time.perf_counter() - t0 < timeout:
            for c in children:  # one process down: its peers would wait for it until timeout
                if not c.alive() and c.exit_code:
                    raise BenchError(f"{c.name} failed:\n{log_tail(c.log_path)}")
            scraped = [_scrape(port) for port in ports]
            if all(m is not None for m in scraped):
                samples.append((time.perf_counter(), sum(m["events"] for m in scraped if m),
                                sum(m["rows_online"] for m in scraped if m)))
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        if any(c.alive() for c in children):
            raise BenchError(f"{processes} stream process(es) did not finish {n:,} events in "
                             f"{timeout:.0f}s")
        for c in children:
            if c.exit_code:
                raise BenchError(f"{c.name} failed:\n{log_tail(c.log_path)}")
    results = [_read_result(log) for log in logs]
    worker = {key: sum(r[key] for r in results)
              for key in ("events", "dlq", "rows_online", "rows_offline", "cpu_s")}
    worker.update(run_s=max(r["run_s"] for r in results),
                  peak_rss_mib=sum(r["peak_rss_mib"] for r in results))
    return {"processes": processes, "preload": pre, "events": n, "process_wall_s": wall,
            "worker": worker, "per_process": results, "sustained": _sustained(samples, n),
            "samples": len(samples)}


def _read_result(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"run_s"' in line:
            result: dict[str, Any] = json.loads(line)
            return result
    raise BenchError(f"stream worker wrote no result:\n{log_tail(log)}")


def _sustained(samples: list[tuple[float, float, float]], n: int) -> dict[str, Any]:
    """Rate between the first samples at >= 10% and >= 90% of the events.

    The window opens only once the sink has written to the online store (the sink builds its
    Feast client lazily, and events can be counted upstream while that import runs).
    """
    lo = next(((t, c) for t, c, rows in samples if c >= 0.1 * n and rows > 0), None)
    hi = next(((t, c) for t, c, _ in samples if c >= 0.9 * n), None)
    if lo is None or hi is None or hi[0] <= lo[0]:
        return {"rate": None, "why": "too few samples between 10% and 90% (run too short)"}
    return {"rate": (hi[1] - lo[1]) / (hi[0] - lo[0]), "from_events": lo[1],
            "to_events": hi[1], "seconds": hi[0] - lo[0]}


def _freshness(bootstrap: str, sizes: Sizes, env: dict[str, str], scratch: Path,
               log_dir: Path) -> dict[str, Any]:
    from streaming.producer import TransactionProducer
    from streaming.traffic import live_events

    port = free_port()
    warm = 200
    argv = _worker_argv(bootstrap, FRESH_TOPIC, scratch, "fresh", port, tail=True)
    with running("stream worker (tail)", argv, env, log_dir / "stream-worker-tail.log") as child:
        with TransactionProducer(bootstrap, topic=FRESH_TOPIC, track_ready=True) as producer:
            producer.wait_ready()  # the harness's producer is up before the worker is timed
            first_s = _first_after_ready(port, child, producer)
            for e in live_events(warm, 100, 20, 0.0, 3, f"warm{int(time.time())}"):
                producer.send(e)
        warm += 1  # the first event
        # Warm means the sink has written its first batches (events are counted upstream).
        _wait_metrics(port, child, lambda m: m["events"] >= warm and m["rows_online"] > 1,
                      get_settings().server_start_timeout_s)
        before = _settled(port, child)
        produce = python("-m", "streaming.produce", "live", "--rate", str(sizes.fresh_rate),
                         "--duration", str(sizes.fresh_duration_s), "--users",
                         str(sizes.stream_users), "--merchants",
                         str(max(sizes.stream_users // 10, 5)), "--bootstrap", bootstrap,
                         "--topic", FRESH_TOPIC, "--id-prefix", f"fresh{int(time.time())}",
                         "--population", "synthetic", "--seed", "7")  # as in earlier runs
        out = run_capture("producer", produce, child.env, log_dir / "stream-produce.log",
                          sizes.fresh_duration_s + 120)
        delivered = _delivered(out)
        _wait_metrics(port, child, lambda m: m["events"] >= warm + delivered, 120)
        after = _settled(port, child)
    buckets = {le: after["buckets"].get(le, 0) - before["buckets"].get(le, 0)
               for le in after["buckets"]}
    return {"rate": sizes.fresh_rate, "duration_s": sizes.fresh_duration_s,
            "first_event_after_ready_s": first_s,
            "producer": out.strip().splitlines()[-1] if out.strip() else "",
            "delivered": delivered, "consumed": after["events"] - before["events"],
            "buckets": {str(k): v for k, v in sorted(buckets.items())},
            "p50_s": histogram_quantile(0.5, buckets), "p99_s": histogram_quantile(0.99, buckets),
            "observations": buckets.get(float("inf"), 0)}


def _first_after_ready(port: int, child: Child, producer: Any) -> float:
    """Seconds from the harness seeing the worker's /ready answer 200 (polled every 20 ms) to
    the online row of one event sent right then being written (the worker's counter)."""
    from streaming.traffic import live_events

    deadline = time.monotonic() + get_settings().server_start_timeout_s
    while True:
        if not child.alive():
            raise BenchError(f"{child.name} exited:\n{log_tail(child.log_path)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name}: /ready not 200 in time")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    ready_at = time.monotonic()
    producer.send(next(live_events(1, 1, 1, 0.0, 5, f"first{int(time.time())}")))
    producer.flush(30)
    _wait_metrics(port, child, lambda m: m["rows_online"] >= 1, 60, poll_s=0.01)
    return time.monotonic() - ready_at


def _delivered(producer_output: str) -> int:
    import re

    m = re.search(r"([\d,]+) delivered, ([\d,]+) not delivered", producer_output)
    if not m:
        raise BenchError(f"unexpected producer output:\n{producer_output[-500:]}")
    return int(m.group(1).replace(",", ""))


def _wait_metrics(port: int, child: Child, ok: Any, timeout_s: float,
                  poll_s: float = 0.1) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited:\n{log_tail(child.log_path)}")
        last = _scrape(port)
        if last is not None and ok(last):
            return last
        time.sleep(poll_s)
    raise BenchError(f"{child.name}: condition not reached in {timeout_s:.0f}s (last {last})")


def _settled(port: int, child: Child, quiet_s: float = 2.0, timeout_s: float = 60) -> dict[str, Any]:
    """Metrics once the online writes have stopped changing for `quiet_s` (sink caught up)."""
    deadline = time.monotonic() + timeout_s
    last = _wait_metrics(port, child, lambda m: True, timeout_s)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = _wait_metrics(port, child, lambda m: True, timeout_s)
        if now["rows_online"] != last["rows_online"] or now["buckets"] != last["buckets"]:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise BenchError(f"{child.name}: online writes still changing after {timeout_s:.0f}s")


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding q."""
    items = sorted(buckets.items())
    total = items[-1][1] if items else 0
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in items:
        if c >= rank:
            if le == float("inf"):
                return prev_le  # beyond the last finite bucket: its bound is all we know
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return None


def _profile(bootstrap: str, env: dict[str, str], scratch: Path, log_dir: Path) -> str:
    s = get_settings()
    port = free_port()
    argv = _worker_argv(bootstrap, THRU_TOPIC, scratch, "profile", port, tail=False)
    with running("stream worker (profiled)", argv, env, log_dir / "stream-worker.log") as child:
        _wait_metrics(port, child, lambda m: m["rows_online"] > 0, s.server_start_timeout_s)
        return profile.record(child.pid, s.profile_seconds, log_dir / "pyspy-stream.txt")


def _measures(section: Section, sizes: Sizes, thru: dict[str, Any], fresh: dict[str, Any],
              push: dict[str, Any]) -> None:
    sustained = thru["sustained"].get("rate")
    worker = thru["worker"]
    section.measures += [
        Measure("sustained events/s (10-90%)", "/s", sustained, push["unpaced_rate"], "higher",
                Target(">=", THROUGHPUT_TARGET),
                note=f"{thru['events']:,} events pre-loaded; stock: {push['unpaced_events']:,} "
                     "events pushed one by one"),
        Measure("events/s incl. start-up and last batch", "/s",
                thru["events"] / worker["run_s"], push["unpaced_rate"], "higher"),
        Measure("CPU per event (all threads)", "µs", _per_event_us(worker, "cpu_s", "events"),
                _per_event_us(push, "unpaced_cpu_s", "unpaced_events"), "lower",
                Target("<=", CPU_PER_EVENT_TARGET_US),
                note="CPU time of the process (user + system) over the whole run / events: "
                     "steadier than the rates when the machine's speed varies; the target is "
                     "for a fast host (probe <= 3 ms), the parse-only ratio below compares "
                     "across hosts"),
        Measure(f"freshness p50 @{sizes.fresh_rate:,.0f}/s", "ms", _ms(fresh["p50_s"]),
                _ms(push["paced"]["p50_s"]), "lower",
                Target("<=", FRESHNESS_P50_TARGET_MS) if sizes.label == "full" else None),
        Measure(f"freshness p99 @{sizes.fresh_rate:,.0f}/s", "ms", _ms(fresh["p99_s"]),
                _ms(push["paced"]["p99_s"]), "lower",
                Target("<=", FRESHNESS_P99_TARGET_MS) if sizes.label == "full" else None),
        Measure("first event served after /ready", "s", fresh["first_event_after_ready_s"],
                None, "lower", Target("<=", FIRST_EVENT_TARGET_S),
                stock_missing="n/a (no dataflow)",
                note="from /ready answering 200 (polled every 20 ms) to the online row of one "
                     "event sent then being written"),
    ]
    section.notes += [
        f"Pre-load: {thru['preload']['events']:,} events in {thru['preload']['seconds']:.1f} s. "
        f"Worker: {worker['events']:,.0f} events counted, {worker['rows_online']:,.0f} online "
        f"rows written (coalesced per user and batch), {worker['rows_offline']:,.0f} history "
        f"rows, {worker['dlq']:,.0f} dead letters, peak RSS {worker['peak_rss_mib']:.0f} MiB, "
        f"run {worker['run_s']:.1f} s (process {thru['process_wall_s']:.1f} s).",
        f"Freshness: {fresh['delivered']:,} events produced open loop at "
        f"{sizes.fresh_rate:,.0f}/s for {sizes.fresh_duration_s:.0f} s "
        f"(`python -m streaming.produce live`; {fresh['producer']}); {fresh['consumed']:,.0f} "
        f"consumed; {fresh['observations']:,.0f} online writes observed. Quantiles are "
        "interpolated within the histogram buckets "
        f"({', '.join(k for k in fresh['buckets'])} s), so they are estimates.",
        f"Stock freshness: {push['paced']['arrivals']:,} arrivals scheduled at "
        f"{sizes.fresh_rate:,.0f}/s, pushed in order as they arrive, "
        f"{push['paced']['not_done']:,} not pushed within the {push['paced']['limit_s']:.0f} s "
        "limit (counted as infinitely late); no Kafka in this path, so it flatters the stock "
        "side. Stock writes online only; ours also writes the offline history.",
    ]


def _cost_measures(section: Section, one: dict[str, Any], two: dict[str, Any],
                   parse_only: dict[str, Any]) -> None:
    """CPU per event of the dataflow (1 and 2 processes) as a multiple of the CPU per event
    of the contract parse alone over the same events: host-independent, unlike microseconds."""
    parse_us = parse_only.get("cpu_us_per_event")
    cpu1 = _per_event_us(one["worker"], "cpu_s", "events")
    cpu2 = _per_event_us(two["worker"], "cpu_s", "events")
    section.measures += [
        Measure("CPU per event / parse-only CPU per event, 1 process", "x",
                _div(cpu1, parse_us), None, "lower", stock_missing="n/a (a ratio of ours)",
                note=f"parse-only pass: {_fmt1(parse_us)} µs/event (median of "
                     f"{parse_only.get('passes', 0)} in-process passes over the same "
                     f"{parse_only.get('events', 0):,} events: "
                     "`streaming.events.parse` of their bytes, process CPU)"),
        Measure("CPU per event / parse-only CPU per event, 2 processes", "x",
                _div(cpu2, parse_us), None, "lower", stock_missing="n/a (a ratio of ours)"),
    ]


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _fmt1(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.1f}"


def _process_measures(section: Section, one: dict[str, Any], two: dict[str, Any],
                      push: dict[str, Any]) -> None:
    """1 and 2 dataflow processes side by side (the stock column: `store.push()`, one
    process, as above)."""
    r1, r2 = one["sustained"].get("rate"), two["sustained"].get("rate")
    cpu1 = _per_event_us(one["worker"], "cpu_s", "events")
    cpu2 = _per_event_us(two["worker"], "cpu_s", "events")
    section.measures += [
        Measure("sustained events/s (10-90%), 2 processes", "/s", r2, push["unpaced_rate"],
                "higher", note=f"1 process: {_fmt(r1)}/s; 2 / 1 = {_ratio(r2, r1)}"),
        Measure("events/s incl. start-up and last batch, 2 processes", "/s",
                two["events"] / two["worker"]["run_s"], push["unpaced_rate"], "higher"),
        Measure("CPU per event, 2 processes (all processes)", "µs", cpu2,
                _per_event_us(push, "unpaced_cpu_s", "unpaced_events"), "lower",
                note=f"1 process: {_fmt(cpu1)} µs; the difference is the exchange between "
                     "the processes (events to their state shard, rows to their sink "
                     "partition) and the second runtime"),
    ]
    section.notes.append(
        f"Processes: the same {one['events']:,} pre-loaded events (4 partitions) read by 1 "
        f"process and by a cluster of 2 (`-i k -a ...`), each from an empty online store: "
        f"{_fmt(r1)} and {_fmt(r2)} events/s sustained, {_fmt(cpu1)} and {_fmt(cpu2)} µs CPU "
        f"per event.  On a 2-core machine the second process competes with the broker, Redis "
        f"and this harness for the same cores, so the gain is bounded.")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def _per_event_us(result: dict[str, Any], cpu_key: str, events_key: str) -> float | None:
    cpu, events = result.get(cpu_key), result.get(events_key)
    return cpu / events * 1e6 if cpu is not None and events else None


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


# --- children ------------------------------------------------------------------------------

def worker_main(a: argparse.Namespace) -> None:
    """The dataflow as `python -m streaming.features` runs it, on the given topic."""
    # Child-only imports: the parent process imports this module too, and need not load
    # Bytewax and Feast (seconds of start-up) for orchestration.
    import logging
    from datetime import timedelta

    from bytewax.recovery import RecoveryConfig
    from bytewax.run import cli_main
    from prometheus_client import REGISTRY

    from streaming import features, metrics
    from streaming.cluster import parse_addresses
    from streaming.config import get_settings as stream_settings
    from streaming.readiness import Readiness
    from streaming.recovery import ensure_recovery_dir, recovery_partitions
    from streaming.sources import KafkaDeadLetterSink
    from streaming.velocity_sink import VelocitySink

    logging.basicConfig(level=logging.WARNING)
    st = stream_settings()
    addresses = parse_addresses(a.addresses) if a.addresses else None
    processes = len(addresses) if addresses else 1
    readiness = Readiness(a.process_id, processes)
    metrics.start_metrics_server("127.0.0.1", a.metrics_port, readiness.http)
    ensure_recovery_dir(a.recovery, recovery_partitions(1, processes), a.process_id, processes)
    source = features.kafka_source(a.bootstrap, a.topic, tail=a.tail,
                                   on_assigned=readiness.partition_assigned)
    sink = VelocitySink(st.feature_repo, a.history, partitions=processes, prefix="bench")
    dlq_sink = KafkaDeadLetterSink(a.bootstrap, a.dlq_topic)
    flow = features.live_flow(source, sink, dlq_sink, st, workers=processes,
                              readiness=readiness)
    # what `streaming.features.run_process` does before the dataflow starts
    features.warm_up(st.feature_repo)
    settle_heap()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    cli_main(flow, workers_per_process=1, process_id=a.process_id if addresses else None,
             addresses=addresses, epoch_interval=timedelta(seconds=st.snapshot_interval_s),
             recovery_config=RecoveryConfig(str(a.recovery)))
    run_s = time.perf_counter() - t0

    def total(name: str, **labels: str) -> float:
        return float(REGISTRY.get_sample_value(name, labels) or 0.0)

    events = sum(total("fraud_stream_events_total", outcome=o)
                 for o in ("applied", "duplicate", "late", "invalid"))
    dlq = sum(m.value for fam in REGISTRY.collect() if fam.name == "fraud_stream_dlq"
              for m in fam.samples if m.name.endswith("_total"))
    print(json.dumps({
        "run_s": run_s, "events": events, "dlq": dlq,
        "rows_online": total("fraud_stream_rows_written_total", store="online"),
        "rows_offline": total("fraud_stream_rows_written_total", store="offline"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_s": _cpu_s() - cpu0,
    }), flush=True)


def _cpu_s() -> float:
    """CPU seconds (user + system, every thread) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def parse_main(a: argparse.Namespace) -> None:
    """Parse-only pass: the pre-loaded events (same generator, seed and ids) as the bytes the
    producer sent, through `streaming.events.parse` (the contract's validation) in-process;
    process CPU per event, median of 3 passes, the heap tuned as the worker tunes it."""
    import statistics

    from streaming.events import Envelope, parse
    from streaming.traffic import live_events

    raw = [e.model_dump_json().encode() for e in live_events(
        a.events, a.users, max(a.users // 10, 5), 0.01, PRELOAD_SEED, a.id_prefix)]
    settle_heap()
    passes = []
    for _ in range(3):
        cpu0 = _cpu_s()
        ok = sum(isinstance(parse(b), Envelope) for b in raw)
        passes.append((_cpu_s() - cpu0) / len(raw) * 1e6)
    print(json.dumps({"events": len(raw), "valid": ok, "passes": len(passes),
                      "cpu_us_per_event": statistics.median(passes),
                      "cpu_us_per_event_passes": passes}), flush=True)


def push_main(a: argparse.Namespace) -> None:
    """Stock path: parse, update the state, `store.push()` one event at a time."""
    import math

    import numpy as np
    from feast import FeatureStore
    from feast.data_source import PushMode

    from feature_repo.config import REPO_DIR
    from streaming.events import Envelope, parse
    from streaming.state import update_velocity
    from streaming.traffic import live_events
    from streaming.velocity_sink import VelocityRow, history_table

    store = FeatureStore(repo_path=str(REPO_DIR))
    arrivals = max(1, int(a.rate * a.window))
    raw = [e.model_dump_json().encode() for e in live_events(
        a.events + arrivals + 20, a.users, max(a.users // 10, 5), 0.01, 11,
        f"push{int(time.time())}")]
    states: dict[str, Any] = {}

    def push_one(b: bytes) -> None:
        env = parse(b, time.time())
        if not isinstance(env, Envelope):
            return
        uid = env.event.user_id
        states[uid], out = update_velocity(states.get(uid), env)
        if isinstance(out, VelocityRow):
            df = history_table([out]).to_pandas()
            store.push(PUSH_SOURCE, df, to=PushMode.ONLINE)

    for b in raw[:20]:  # warm-up: registry cache, connections
        push_one(b)
    t0, cpu0 = time.perf_counter(), _cpu_s()
    for b in raw[20:20 + a.events]:
        push_one(b)
    unpaced_s = time.perf_counter() - t0
    unpaced_cpu_s = _cpu_s() - cpu0

    limit_s = max(30.0, 4 * arrivals / max(a.events / unpaced_s, 1.0))
    limit_s = min(limit_s, 300.0)
    fresh = np.full(arrivals, np.inf)
    paced = raw[20 + a.events:]
    start = time.perf_counter() + 0.01
    for i in range(arrivals):
        due = start + i / a.rate
        now = time.perf_counter()
        if now - start > limit_s:
            break
        if now < due:
            time.sleep(due - now)
        push_one(paced[i])
        fresh[i] = time.perf_counter() - due

    def q(p: float) -> float | None:
        v = float(np.percentile(fresh, p, method="higher"))
        return None if math.isinf(v) else v

    print(json.dumps({
        "unpaced_events": a.events, "unpaced_s": unpaced_s,
        "unpaced_rate": a.events / unpaced_s, "unpaced_cpu_s": unpaced_cpu_s,
        "paced": {"rate": a.rate, "arrivals": arrivals, "limit_s": limit_s,
                  "not_done": int(np.isinf(fresh).sum()), "p50_s": q(50), "p99_s": q(99)},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stream")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--bootstrap", required=True)
    w.add_argument("--topic", required=True)
    w.add_argument("--dlq-topic", required=True)
    w.add_argument("--history", type=Path, required=True)
    w.add_argument("--recovery", type=Path, required=True)
    w.add_argument("--metrics-port", type=int, required=True)
    w.add_argument("--tail", action="store_true")
    w.add_argument("--process-id", type=int, default=0)  # of a cluster (`--addresses`)
    w.add_argument("--addresses", default="")
    ps = sub.add_parser("push")
    ps.add_argument("--events", type=int, required=True)
    ps.add_argument("--rate", type=float, required=True)
    ps.add_argument("--window", type=float, required=True)
    ps.add_argument("--users", type=int, required=True)
    pp = sub.add_parser("parse")
    pp.add_argument("--events", type=int, required=True)
    pp.add_argument("--users", type=int, required=True)
    pp.add_argument("--id-prefix", required=True)
    a = p.parse_args(argv)
    if a.cmd == "worker":
        worker_main(a)
    elif a.cmd == "parse":
        parse_main(a)
    else:
        push_main(a)


if __name__ == "__main__":
    main(sys.argv[1:])
