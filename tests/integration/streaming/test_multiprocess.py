"""The feature dataflow on several processes is exact: the same online rows and history as one.

One topic on a private Tansu broker (4 partitions) holds a fixed set of events: 60 users,
irregular amounts and merchants, a re-sent transaction, an event arriving out of order within
the lateness window and one beyond it.  Three runs of the real `python -m streaming.features`,
started together, read it from the start, each with its own `redis-server`, data directory
(offline history table) and recovery directory:

1. one process (the reference), reading to the end of the topic (`STREAMING_TAIL=false`);
2. `--processes 2`, likewise;
3. `--processes 2` tailing, with small micro-batches; once the snapshots hold a quarter of the
   topic, process 1 is SIGKILLed: its peer stops, the supervisor restarts the cluster, which
   resumes from the last snapshot of each process.

Runs 2 and 3 must leave byte-identical Redis hashes (every key and field Feast's layout has),
and the same history rows as run 1 (run 3 may hold identical rows twice, rewritten by the
replay after the kill, which the point-in-time join reads as one).  Each process's `/ready`
answers 503 before its dataflow runs and 200 after, with its own input partitions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
import redis

from devenv.broker import TansuBroker
from devenv.localproc import port_open
from feature_repo import history as offline_history
from feature_repo.contract import TransactionEvent
from feature_repo.paths import velocity_history_dir
from scoring.topics import ensure_topics
from streaming.cluster import free_ports
from streaming.producer import TransactionProducer
from tests.integration.streaming.test_streaming import event, events_total, metrics
from tests.procs import redis_server, wait_for

PROJECT = Path(__file__).resolve().parents[3]
USERS, ROUNDS = 60, 50
RUN_BOUND_S = 150.0  # start-up (Python, Bytewax, Feast) of two processes on a busy machine
Row = tuple[Any, ...]


def topic_events(run: str) -> list[TransactionEvent]:
    """The topic's events, in production order (each user's events stay in order: one
    partition per user)."""
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    out = []
    for i in range(ROUNDS):
        for k in range(USERS):
            user = f"mp-{run}-{k:02d}"
            ts = base + timedelta(seconds=20 * i + k)
            if i == 7 and k % 5 == 0:  # out of order, within the 10 min lateness window
                ts -= timedelta(seconds=45)
            out.append(event(f"{user}-{i}", user, ts, round(3.0 + (i * 7 + k) % 40 * 1.25, 2),
                             f"m-{(i * 3 + k) % 11}"))
        if i == 20:  # a re-sent transaction (a duplicate) and one far too late
            out.append(out[-1])
            late_user = f"mp-{run}-00"
            out.append(event(f"{late_user}-late", late_user, base - timedelta(hours=1), 9.99,
                             "m-late"))
    return out


class Flow:
    """The real dataflow with its own Redis, data and recovery directories, in one of three
    forms: "single" (`python -m streaming.features`), "supervised" (`--processes N`) or
    "cluster" (N processes `-i k -a ...` started here, each with a recovery directory of its
    own, as on separate hosts)."""

    def __init__(self, name: str, form: str, processes: int, bootstrap: str, redis_url: str,
                 root: Path, env: dict[str, str]) -> None:
        self.name, self.form, self.processes, self.root = name, form, processes, root
        self.ports = _consecutive_ports(processes)
        self.redis_url = redis_url
        root.mkdir()
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "REDIS_URL": redis_url,
            "FRAUD_DATA_DIR": str(root / "data"),
            "STREAMING_RECOVERY_DIR": str(root / "recovery"),
            "STREAMING_METRICS_PORT": str(self.ports[0]),
            "STREAMING_SNAPSHOT_INTERVAL_S": "0.5",
            **env,
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addresses = ";".join(f"127.0.0.1:{p}" for p in free_ports(processes))

    def start(self, k: int | None = None) -> Flow:
        """Start the flow (in the "cluster" form: process `k` of it, all when None)."""
        argv = [sys.executable, "-m", "streaming.features"]
        if self.form == "supervised":
            self._spawn(argv + ["--processes", str(self.processes)], self.env, "")
        elif self.form == "single":
            self._spawn(argv, self.env, "")
        else:
            for i in range(self.processes) if k is None else [k]:
                self._spawn(argv + ["-i", str(i), "-a", self.addresses], {
                    **self.env, "STREAMING_METRICS_PORT": str(self.ports[i]),
                    "STREAMING_RECOVERY_DIR": str(self.root / f"recovery-{i}")}, f"-{i}")
        return self

    def _spawn(self, argv: list[str], env: dict[str, str], suffix: str) -> None:
        with (self.root / f"{self.name}{suffix}.log").open("ab") as log:
            self.procs.append(subprocess.Popen(argv, cwd=PROJECT, env=env,
                                               stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=subprocess.STDOUT))

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))

    def log_tail(self) -> str:
        return self.log()[-4000:]

    def ready(self, k: int) -> tuple[int, dict[str, Any] | None]:
        """(HTTP status of process k's /ready, its JSON body); (0, None) while nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[k]}/ready",
                                        timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError:
            return 0, None

    def all_ready(self) -> list[dict[str, Any]] | None:
        """Every process's /ready body once all answer 200 (None before)."""
        if any(p.poll() is not None for p in self.procs):
            raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
        answers = [self.ready(k) for k in range(self.processes)]
        if all(status == 200 for status, _ in answers):
            return [body for _, body in answers if body is not None]
        return None

    def applied(self) -> float:
        return sum(events_total(metrics(port), "applied") for port in self.ports)

    def wait_exit(self) -> None:
        """Every process of the flow exits 0 (read to the end of the topic)."""
        for proc in self.procs:
            try:
                code = proc.wait(RUN_BOUND_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{self.name} did not finish:\n{self.log_tail()}") from None
            assert code == 0, f"{self.name} exited {code}:\n{self.log_tail()}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def online(self) -> dict[bytes, dict[bytes, bytes]]:
        """Every Redis hash the run wrote: key -> {field: value}, as stored."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            return {key: client.hgetall(key) for key in client.scan_iter(count=1000)}
        finally:
            client.close()

    def history(self) -> list[Row]:
        """The stream's rows in the run's offline history table, as hashable tuples."""
        table = offline_history.read(velocity_history_dir(self.root / "data"))
        if not table.num_rows:
            return []
        rows = table.filter(pc.equal(table[offline_history.ORIGIN], offline_history.STREAM))
        return [tuple(tuple(v) if isinstance(v, list) else v for v in r.values())
                for r in rows.drop_columns([offline_history.ORIGIN]).to_pylist()]


def _consecutive_ports(n: int) -> list[int]:
    """`n` consecutive free loopback ports (process k serves on the first + k)."""
    for _ in range(50):
        (base,) = free_ports(1)
        ports = list(range(base, base + n))
        if ports[-1] < 65536 and not any(port_open("127.0.0.1", p) for p in ports):
            return ports
    raise AssertionError("no run of free ports found")


@pytest.fixture(scope="module")
def topic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[TransactionEvent]]]:
    """A private broker whose `transactions` topic holds `topic_events`."""
    tmp = tmp_path_factory.mktemp("multiprocess-broker")
    broker = TansuBroker(log_path=tmp / "tansu.log")
    broker.start()
    try:
        ensure_topics(broker.bootstrap)
        events = topic_events(uuid_tag())
        producer = TransactionProducer(broker.bootstrap)
        for e in events:
            producer.send(e)
        assert producer.flush(60) == 0, producer.errors
        yield broker.bootstrap, events
    finally:
        broker.stop()


def uuid_tag() -> str:
    return uuid.uuid4().hex[:6]


def test_two_processes_match_one_and_survive_a_sigkill(
    topic: tuple[str, list[TransactionEvent]], store: Any, tmp_path: Path
) -> None:
    bootstrap, events = topic
    users = {e.user_id for e in events}
    applied = len({e.transaction_id for e in events}) - 1  # the late one goes to the DLQ
    t0 = time.monotonic()
    to_end = {"STREAMING_TAIL": "false"}
    with redis_server(tmp_path / "redis-1.log") as url1, \
            redis_server(tmp_path / "redis-2.log") as url2, \
            redis_server(tmp_path / "redis-3.log") as url3:
        one = Flow("one", "single", 1, bootstrap, url1, tmp_path / "one", to_end)
        two = Flow("two", "cluster", 2, bootstrap, url2, tmp_path / "two", to_end)
        kill = Flow("kill", "supervised", 2, bootstrap, url3, tmp_path / "kill",
                    {"STREAMING_SOURCE_BATCH_SIZE": "5"})
        try:
            # all three start together (separate Redis and directories); 2 in the cluster
            # form, whose process 1 starts only later: process 0 answers 503 meanwhile
            one.start()
            two.start(0)
            kill.start()
            # 3, the supervised form: SIGKILL one process mid-replay, once the snapshots hold
            # a quarter of the rows (a sink's history commit comes right before its snapshot)
            ready = wait_for("both processes ready", kill.all_ready, RUN_BOUND_S)
            first_pid = ready[1]["pid"]
            wait_for("snapshots covering a quarter of the topic",
                     lambda: len(kill.history()) >= applied * 0.25, RUN_BOUND_S)
            at_kill = kill.applied()
            os.kill(first_pid, signal.SIGKILL)
            waiting = wait_for("process 0 of the cluster form to answer /ready",
                               lambda: (r := two.ready(0))[0] and r, RUN_BOUND_S)
            time.sleep(1.0)
            still = two.ready(0)
            two.start(1)
            one.wait_exit()
            two.wait_exit()
            reference_online, reference_history = one.online(), one.history()
            cluster_online, cluster_history = two.online(), two.history()
            again = wait_for("the restarted cluster ready", lambda: (
                (r := kill.all_ready()) and r[1]["pid"] != first_pid and r), RUN_BOUND_S)
            wait_for("the restarted cluster to write every row",
                     lambda: kill.online() == reference_online, RUN_BOUND_S)
            after = kill.applied()
            killed_history = wait_for(
                "the history to cover every row",
                lambda: (h := kill.history()) and set(h) >= set(reference_history) and h)
        finally:
            for f in (one, two, kill):
                f.stop()

    # the reference: one hash per user, one history row per applied event
    assert len(reference_online) == len(users)
    assert len(reference_history) == applied
    # the cluster form: 503 until the whole cluster runs, then identical rows
    assert waiting[0] == 503 and still[0] == 503 and still[1]["ready"] is False, still
    assert cluster_online == reference_online
    assert Counter(cluster_history) == Counter(reference_history)
    # the supervised form: each process reads its own partitions; exact after the kill
    parts = sorted(p for body in ready for p in body["partitions"])
    assert parts == [f"{i}-transactions" for i in range(4)], ready
    assert all(len(body["partitions"]) == 2 and body["startup_s"] > 0 for body in ready), ready
    assert at_kill < applied, "the kill landed after the whole topic was applied"
    log = kill.log()
    print("\n".join(line for line in log.splitlines() if "WARNING" in line))
    assert "restarting the cluster" in log, log[-4000:]
    assert {b["pid"] for b in again}.isdisjoint({b["pid"] for b in ready})
    # resumed from the snapshots: the events they held are not applied again
    assert 0 < after <= applied * 0.9, (after, applied)
    assert set(killed_history) == set(reference_history)
    print(f"three runs in {time.monotonic() - t0:.0f} s; kill after {at_kill:.0f} of "
          f"{applied} events applied, {after:.0f} applied after the restart, "
          f"{len(killed_history) - len(set(killed_history))} identical history rows replayed")
