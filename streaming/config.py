"""Settings of the streaming runtimes (prefix `STREAMING_`; broker from `KAFKA_BOOTSTRAP_SERVERS`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from feature_repo.config import PROJECT_DIR, REPO_DIR, apply_env_defaults
from feature_repo.contract import MAX_FUTURE_SECONDS_ENV, max_future_seconds
from scoring.kafka_conf import DEFAULT_BOOTSTRAP

DEFAULT_STATE_SHARDS = 256  # keys of the velocity state (see `streaming.state.ShardLogic`)


class StreamingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMING_")

    bootstrap_servers: str = Field(
        default=DEFAULT_BOOTSTRAP,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "STREAMING_BOOTSTRAP_SERVERS"),
    )
    feature_repo: Path = REPO_DIR
    recovery_dir: Path = PROJECT_DIR / ".run" / "recovery"
    # partitions of a new recovery directory; at least one per dataflow process is used
    recovery_partitions: int = 1
    # dataflow processes of `python -m streaming.features` on this host (`--processes`)
    processes: int = Field(default=1, ge=1)
    snapshot_interval_s: float = 2.0  # Bytewax epoch: state snapshot + offline flush period
    backup_interval_s: float = 0.0  # how long old snapshots are kept
    # keys of the velocity state; 0: one per user
    state_shards: int = Field(default=DEFAULT_STATE_SHARDS, ge=0)
    source_batch_size: int = 2000
    source_fetch_wait_ms: int = 20  # longest a Kafka fetch waits for data (librdkafka: 500)
    metrics_host: str = "127.0.0.1"  # loopback unless deliberately exposed
    metrics_port: int = 9101  # process k of `--processes N` serves on metrics_port + k
    score_metrics_port: int = 9102
    tail: bool = True  # keep waiting for new events at the end of the topic
    # Where a partition resumes when its offset lies past the log's end or its topic was
    # recreated (a lost log; `streaming.kafka_input.KafkaInput`): "earliest" re-reads the new log
    # (replays are idempotent), "latest" skips what it already holds.
    offset_reset: Literal["earliest", "latest"] = "earliest"
    # How long the DLQ sink retries a dead letter the broker does not take, before it counts
    # it in `fraud_stream_dlq_failed_total`, logs it at ERROR and goes on (`KafkaDeadLetterSink`)
    dlq_retry_s: float = Field(default=30.0, ge=0)
    # event_timestamp may lie at most this far ahead: one setting for the API and the stream
    max_future_seconds: float = Field(
        default_factory=max_future_seconds, validation_alias=MAX_FUTURE_SECONDS_ENV)


@lru_cache
def get_settings() -> StreamingSettings:
    apply_env_defaults()
    return StreamingSettings()
