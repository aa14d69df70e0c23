"""The prediction log: scored requests with their full feature vectors, for audits and drift.

`PredictionLog.record(results, events)` runs after every scoring call.  Each record is
`prediction_record`, the record the streaming scorer writes too: ids, request
time, score, decision, model version, feature service, missing features, every model input,
and what a replay needs: `amount`, `currency`, `channel`, and for the online rows that were
read, `feature_ages` (request time minus row time, seconds) and `stale_features`.

Sinks, each optional:

* **Kafka** (`SERVING_PREDICTION_LOG_KAFKA` = bootstrap servers): JSON on the `predictions`
  topic keyed by user_id.  The request only queues the record; a background thread serializes
  and produces the queue every 20 ms without waiting for acknowledgements.  A full queue (the
  thread's or librdkafka's) drops the record, and failed deliveries are counted, never retried
  by this code.
* **Parquet** (`SERVING_PREDICTION_LOG_DIR`): records are buffered and written by a background
  thread every `flush_records` records or `flush_seconds`, whichever comes first, to
  `<dir>/date=YYYY-MM-DD/part-*.parquet` (the request's UTC date).  Each file is written under
  a dot-name and renamed into place, so readers never see a partial file.
  `training.skew_audit` reads this directory.

Sampling (`SERVING_PREDICTION_LOG_SAMPLE`) is deterministic: a transaction is logged iff the
hash of its id falls below the rate, so every replica and rerun logs the same transactions.
The drift monitor (scoring/drift.py) sees every vector, sampled or not, and compares them with
the training reference of the model serving as champion (`use_reference`, on every swap).

Delivery: best effort, at most once.  Nothing here can fail or delay a request: records still
buffered when the process dies are lost, and every loss is counted in
`fraud_prediction_log_records_total{sink, outcome="dropped"|"failed"}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import Producer

from scoring import metrics
from scoring.config import ScoringSettings
from scoring.drift import DriftMonitor, load_reference
from scoring.features import value_rows
from scoring.kafka_conf import producer_conf
from scoring.scorer import ScoreResult
from scoring.topics import PREDICTIONS

log = logging.getLogger("scoring.prediction_log")

# The parquet log's columns; `features` and `feature_ages` are JSON objects (name -> value),
# which keeps ints ints and floats exact whatever a batch happens to contain.
LOG_SCHEMA = pa.schema([
    ("transaction_id", pa.string()),
    ("user_id", pa.string()),
    ("merchant_id", pa.string()),
    ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ("scored_at", pa.timestamp("us", tz="UTC")),
    ("score", pa.float64()),
    ("decision", pa.string()),
    ("model_version", pa.string()),
    ("feature_service", pa.string()),
    ("amount", pa.float64()),
    ("currency", pa.string()),
    ("channel", pa.string()),
    ("missing_features", pa.list_(pa.string())),
    ("stale_features", pa.list_(pa.string())),
    ("features", pa.string()),
    ("feature_ages", pa.string()),
])
_JSON_COLUMNS = ("features", "feature_ages")
_TIME_COLUMNS = ("event_timestamp", "scored_at")


def prediction_record(result: Any, event: Any) -> dict[str, Any]:
    """The JSON record written to `predictions` (and `fraud-alerts`), by the stream scorer and
    the HTTP scorer's prediction log alike: ids, times, score, decision, model version, feature
    service, every model input, and what an audit replay needs (the request fields, the age
    of each online row read and which of them were stale)."""
    return {
        "transaction_id": result.transaction_id,
        "user_id": event.user_id,
        "merchant_id": event.merchant_id,
        "event_timestamp": event.event_timestamp.isoformat(),
        "scored_at": datetime.now(UTC).isoformat(),
        "score": result.score,
        "decision": result.decision,
        "model_version": result.model_version,
        "feature_service": result.feature_service,
        "missing_features": result.vector.missing,
        "features": {k: (None if isinstance(v, float) and v != v else v)
                     for k, v in result.vector.values.items()},
        "amount": float(event.amount),
        "currency": event.currency,
        "channel": event.channel,
        "stale_features": list(result.vector.stale),
        "feature_ages": dict(result.vector.ages),
    }


def sampled(transaction_id: str, rate: float) -> bool:
    """Whether a transaction is logged at `rate` (stable across processes: a hash, not random)."""
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(transaction_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def _json_default(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else str(v)  # numpy scalars


def to_table(records: Sequence[dict[str, Any]]) -> pa.Table:
    """Records as an Arrow table in LOG_SCHEMA."""
    cols: dict[str, list[Any]] = {name: [] for name in LOG_SCHEMA.names}
    for rec in records:
        for name in LOG_SCHEMA.names:
            v = rec.get(name)
            if name in _JSON_COLUMNS:
                v = json.dumps(v, default=_json_default)
            elif name in _TIME_COLUMNS:
                v = datetime.fromisoformat(str(v))
            cols[name].append(v)
    return pa.table(cols, schema=LOG_SCHEMA)


class ParquetSink:
    """Buffered parquet files in `directory`, written by a daemon thread (see module docstring)."""

    def __init__(self, directory: Path, flush_records: int = 1000, flush_seconds: float = 5.0,
                 max_buffered: int | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._flush_records = flush_records
        self._flush_seconds = flush_seconds
        self._max = max_buffered or max(20 * flush_records, 10_000)
        self._buffer: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def add(self, records: list[dict[str, Any]]) -> None:
        with self._cond:
            room = self._max - len(self._buffer)
            if room < len(records):  # the writer is behind: shed load, never block
                metrics.PREDICTION_LOG.labels("parquet", "dropped").inc(len(records) - room)
                records = records[:max(room, 0)]
            self._buffer.extend(records)
            if len(self._buffer) >= self._flush_records:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self._flush_seconds
                while (not self._closed and len(self._buffer) < self._flush_records
                       and (left := deadline - time.monotonic()) > 0):
                    self._cond.wait(left)
                batch, self._buffer = self._buffer, []
                closing = self._closed
            if batch:
                self._write(batch)
            if closing:
                return

    def _write(self, batch: list[dict[str, Any]]) -> None:
        try:
            by_date: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for rec in batch:
                by_date[rec["event_timestamp"][:10]].append(rec)
            for day, recs in by_date.items():
                part = self.directory / f"date={day}"
                part.mkdir(exist_ok=True)
                name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
                tmp = part / f".{name}.tmp"
                pq.write_table(to_table(recs), tmp)
                os.replace(tmp, part / name)
            metrics.PREDICTION_LOG.labels("parquet", "written").inc(len(batch))
        except Exception:  # noqa: BLE001 - a logging failure must not stop the writer
            log.exception("prediction log: writing %d records failed", len(batch))
            metrics.PREDICTION_LOG.labels("parquet", "failed").inc(len(batch))

    def close(self) -> None:
        """Write what is buffered and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)


class KafkaSink:
    """JSON records on the `predictions` topic, serialized and produced by a background thread.

    `add` only appends to a bounded queue (the scorer's event loop never serializes or calls
    librdkafka); the thread drains it every `interval_s`, producing without waiting for
    acknowledgements.  `close` produces what is queued, then flushes.
    """

    def __init__(self, bootstrap: str, topic: str | None = None, *,
                 max_buffered: int = 100_000, interval_s: float = 0.02,
                 **overrides: Any) -> None:
        """`overrides` are producer settings (scoring.kafka_conf.producer_conf)."""
        self.topic = topic or PREDICTIONS
        # Not idempotent: a long-lived producer must survive broker restarts (kafka_conf), and
        # this log is at-most-once anyway.
        self._producer = Producer(producer_conf(
            bootstrap, enable_idempotence=False, linger_ms=50,
            error_cb=lambda err: log.warning("prediction log producer: %s", err), **overrides,
        ))
        self._pending: deque[dict[str, Any]] = deque()
        self._max = max_buffered
        self._interval_s = interval_s
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prediction-log-kafka",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _delivered(err: Any, msg: Any) -> None:
        if err is None:
            metrics.PREDICTION_LOG.labels("kafka", "delivered").inc()
        else:
            metrics.PREDICTION_LOG.labels("kafka", "failed").inc()
            log.warning("prediction log: delivery failed: %s", err)

    def add(self, records: list[dict[str, Any]]) -> None:
        room = self._max - len(self._pending)
        if room < len(records):  # the thread is behind: shed load, never block
            metrics.PREDICTION_LOG.labels("kafka", "dropped").inc(len(records) - max(room, 0))
            records = records[:max(room, 0)]
        self._pending.extend(records)

    def _run(self) -> None:
        while True:
            closing = self._closed  # read first: what close() queued before is drained below
            self._produce_pending()
            self._producer.poll(0)  # delivery callbacks
            if closing:
                return
            self._wake.wait(self._interval_s)

    def _produce_pending(self) -> None:
        while self._pending:
            rec = self._pending.popleft()
            try:
                self._producer.produce(self.topic, key=rec["user_id"].encode(),
                                       value=json.dumps(rec, default=_json_default).encode(),
                                       on_delivery=self._delivered)
            except BufferError:  # librdkafka's local queue full: drop rather than wait
                metrics.PREDICTION_LOG.labels("kafka", "dropped").inc()
            except Exception:  # noqa: BLE001 - one bad record must not stop the thread
                log.exception("prediction log: producing a record failed")
                metrics.PREDICTION_LOG.labels("kafka", "failed").inc()

    def close(self, timeout_s: float = 5.0) -> None:
        """Produce what is queued, then wait up to `timeout_s` for deliveries."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._pending and not self._thread.is_alive():  # added after the last drain
            self._produce_pending()
        left = self._producer.flush(timeout_s)
        if left:
            metrics.PREDICTION_LOG.labels("kafka", "dropped").inc(left)
            log.warning("prediction log: %d records undelivered at shutdown", left)


class PredictionLog:
    """Fan-out of scored requests to the configured sinks and the drift monitor."""

    def __init__(self, sinks: Sequence[ParquetSink | KafkaSink] = (), sample: float = 1.0,
                 drift: DriftMonitor | None = None, drift_window: int = 5000,
                 drift_interval_s: float = 60.0) -> None:
        self.sinks = list(sinks)
        self.sample = sample
        self.drift = drift
        self.drift_source: Path | None = None  # the artifact whose reference `drift` uses
        self._drift_window = drift_window
        self._drift_interval = drift_interval_s

    @classmethod
    def from_settings(cls, settings: ScoringSettings, artifact_dir: Path | None = None
                      ) -> PredictionLog:
        """Sinks from the settings; drift against `artifact_dir`'s reference.json, if any."""
        sinks: list[ParquetSink | KafkaSink] = []
        if settings.prediction_log_dir is not None:
            sinks.append(ParquetSink(settings.prediction_log_dir,
                                     settings.prediction_log_flush_records,
                                     settings.prediction_log_flush_seconds))
        if settings.prediction_log_kafka:
            sinks.append(KafkaSink(settings.prediction_log_kafka))
        plog = cls(sinks, settings.prediction_log_sample, drift_window=settings.drift_window,
                   drift_interval_s=settings.drift_interval_seconds)
        if artifact_dir is not None:
            plog.use_reference(artifact_dir)
        return plog

    def use_reference(self, artifact_dir: Path) -> None:
        """Measure drift against `artifact_dir`'s training reference from now on.

        The scorer calls this when the champion changes (promotion, rollback, reload): the
        window starts empty, and the old monitor's `fraud_feature_psi` gauges are removed, so
        no PSI against the previous model's training data outlives it.  Without a reference
        file the drift gauges stop.  Call it from the thread that calls `record`.
        """
        if artifact_dir == self.drift_source:
            return
        reference = load_reference(artifact_dir)
        old = self.drift
        self.drift = (None if reference is None else
                      DriftMonitor(reference, self._drift_window, self._drift_interval))
        self.drift_source = artifact_dir
        if old is not None:
            old.close()

    def record(self, results: Sequence[ScoreResult], events: Sequence[Any]) -> None:
        """Log one scoring call (cheap and non-blocking; never raises)."""
        try:
            if self.drift is not None:
                self.drift.observe_rows(value_rows([r.vector for r in results],
                                                   self.drift.features))
            if not self.sinks:
                return
            records = [prediction_record(r, e) for r, e in zip(results, events, strict=True)
                       if sampled(r.transaction_id, self.sample)]
            if records:
                for sink in self.sinks:
                    sink.add(records)
        except Exception:  # noqa: BLE001 - logging must never fail a request
            log.exception("prediction log: record failed")
            metrics.PREDICTION_LOG.labels("all", "failed").inc(len(results))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.drift is not None:
            self.drift.close()
