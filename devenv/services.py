"""`python -m devenv.services up|down|status`: the local broker and Redis behind `make up`.

`up` starts, detached, only what does not already answer: a Tansu broker (in-memory, 127.0.0.1)
at `KAFKA_BOOTSTRAP_SERVERS`, and a throw-away `redis-server` (no persistence) at `REDIS_URL`;
then it creates the topics. It records pid and log files under `SERVICES_RUN_DIR` (`.run/`).
`down` stops only processes recorded there (SIGTERM, SIGKILL after `SERVICES_STOP_TIMEOUT_S`);
a Redis or broker that was already running is never touched. Both commands are idempotent.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import redis
from confluent_kafka import KafkaException
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from devenv.broker import MEMORY_STORAGE, TansuBroker, kafka_answers
from devenv.localproc import (
    LOOPBACK_HOSTS,
    pid_alive,
    pid_matches,
    port_open,
    read_pid,
    spawn,
    split_host_port,
    stop_pid,
)
from feature_repo.config import DEFAULT_REDIS_URL
from scoring.topics import ensure_topics
from streaming.config import get_settings as get_streaming_settings

log = logging.getLogger(__name__)

# A scratch Redis: nothing written to disk, runs in the foreground of its own session.
_REDIS_EPHEMERAL = ("--save", "", "--appendonly", "no", "--daemonize", "no")


class ServicesSettings(BaseSettings):
    """Local-services settings (prefix `SERVICES_`); the addresses are the shared variables."""

    model_config = SettingsConfigDict(env_prefix="SERVICES_", populate_by_name=True)

    redis_url: str = Field(default=DEFAULT_REDIS_URL, validation_alias="REDIS_URL")
    run_dir: Path = Path(".run")  # relative to the working directory (the project root)
    start_timeout_s: float = 20.0
    stop_timeout_s: float = 10.0


@lru_cache
def get_settings() -> ServicesSettings:
    """The process-wide settings, read from the environment on first use."""
    return ServicesSettings()


@dataclass(frozen=True)
class Service:
    """A service `up` may start: where it answers and which files record our process."""

    name: str
    host: str
    port: int
    needle: str  # substring of our process's command line, guards against pid reuse
    run_dir: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def our_pid(self) -> int | None:
        """Pid of the live process `up` recorded for this service, if any."""
        pid = read_pid(self.pid_file)
        return pid if pid is not None and pid_alive(pid) and pid_matches(pid, self.needle) else None


def _services(settings: ServicesSettings) -> tuple[Service, Service]:
    kafka_host, kafka_port = split_host_port(get_streaming_settings().bootstrap_servers, 9092)
    parsed = urlparse(settings.redis_url)
    redis_host, redis_port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    return (
        Service("kafka", kafka_host, kafka_port, MEMORY_STORAGE, settings.run_dir),
        Service("redis", redis_host, redis_port, "redis-server", settings.run_dir),
    )


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis server answers at `url` (an auth error still means one answers)."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError):
        return True
    except redis.RedisError:
        return False
    finally:
        client.close()
    return True


def _up_kafka(svc: Service, settings: ServicesSettings) -> bool:
    bootstrap = get_streaming_settings().bootstrap_servers
    listening = port_open(svc.host, svc.port)
    try:
        if listening and kafka_answers(bootstrap):
            _report(svc, f"already running ({_owner(svc.our_pid())})")
        elif listening:
            return _report(svc, "port taken by something that is not a Kafka broker", ok=False)
        elif svc.host not in LOOPBACK_HOSTS:
            return _report(svc, "not answering and not local: start it yourself", ok=False)
        else:
            broker = TansuBroker(svc.port, log_path=svc.log_file, detach=True)
            broker.start(timeout_s=settings.start_timeout_s)
            svc.pid_file.write_text(f"{broker.pid}\n")
            _report(svc, f"started Tansu (pid {broker.pid}, log {svc.log_file})")
        created = ensure_topics(bootstrap, timeout_s=settings.start_timeout_s)
    except (RuntimeError, TimeoutError, KafkaException) as exc:
        return _report(svc, f"failed: {exc}", ok=False)
    return _report(svc, f"topics ready (created: {', '.join(created) or 'none'})")


def _up_redis(svc: Service, settings: ServicesSettings) -> bool:
    if redis_answers(settings.redis_url):
        return _report(svc, f"already running ({_owner(svc.our_pid())})")
    if port_open(svc.host, svc.port):
        return _report(svc, "port taken by something that is not Redis", ok=False)
    binary = shutil.which("redis-server")
    if svc.host not in LOOPBACK_HOSTS or binary is None:
        return _report(svc, "not answering, and no local redis-server to start", ok=False)
    argv = [binary, "--port", str(svc.port), "--bind", "127.0.0.1", *_REDIS_EPHEMERAL]
    argv += ["--dir", str(svc.run_dir.resolve())]
    proc = spawn(argv, svc.log_file, detach=True)
    svc.pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + settings.start_timeout_s
    while not redis_answers(settings.redis_url, 0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_pid(proc.pid, settings.stop_timeout_s)
            svc.pid_file.unlink(missing_ok=True)
            return _report(svc, f"redis-server failed to start, see {svc.log_file}", ok=False)
        time.sleep(0.05)
    return _report(svc, f"started redis-server (pid {proc.pid}, not persisted, log {svc.log_file})")


def up(settings: ServicesSettings) -> bool:
    """Start what is missing and create the topics; True if every service answers afterwards."""
    kafka, redis_svc = _services(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    return all([_up_kafka(kafka, settings), _up_redis(redis_svc, settings)])


def down(settings: ServicesSettings) -> bool:
    """Stop the processes `up` recorded; True if none of them is left running."""
    ok = True
    for svc in _services(settings):
        pid = read_pid(svc.pid_file)
        if pid is None:
            _report(svc, "nothing to stop (not started by up)")
            continue
        if svc.our_pid() is None:
            _report(svc, f"pid {pid} no longer running; removed stale pid file")
        elif stop_pid(pid, settings.stop_timeout_s):
            _report(svc, f"stopped (pid {pid})")
        else:
            ok = _report(svc, f"pid {pid} did not exit", ok=False)
            continue
        svc.pid_file.unlink(missing_ok=True)
    return ok


def status(settings: ServicesSettings) -> bool:
    """Report what answers; True if both the broker and Redis do."""
    kafka, redis_svc = _services(settings)
    answers = {
        kafka: port_open(kafka.host, kafka.port)
        and kafka_answers(get_streaming_settings().bootstrap_servers),
        redis_svc: redis_answers(settings.redis_url),
    }
    for svc, ok in answers.items():
        _report(svc, f"answering ({_owner(svc.our_pid())})" if ok else "not answering", ok=ok)
    return all(answers.values())


def _owner(pid: int | None) -> str:
    return f"pid {pid}, started by up" if pid else "not started by up"


def _report(svc: Service, message: str, *, ok: bool = True) -> bool:
    log.log(logging.INFO if ok else logging.ERROR, "%-5s %-21s %s", svc.name, svc.address, message)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 0 when the command achieved what it says."""
    parser = argparse.ArgumentParser(prog="python -m devenv.services", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    command = {"up": up, "down": down, "status": status}[args.command]
    return 0 if command(get_settings()) else 1


if __name__ == "__main__":
    sys.exit(main())
