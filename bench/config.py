"""Benchmark settings (prefix `BENCH_`) and the sizes of a full and a `--quick` run."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from feature_repo.config import PROJECT_DIR, apply_env_defaults


class BenchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BENCH_")

    run_dir: Path = PROJECT_DIR / ".run" / "bench"  # logs, prepared data sets, scratch
    reports_dir: Path = PROJECT_DIR / "reports"
    workers: int = 2  # server processes, ours and `feast serve` alike (one per core here)
    stream_redis_db: int = 12  # the stream benchmark writes here (flushed before and after)
    prepared_redis_db: int = 11  # online store of data sets the benchmark prepares itself
    server_start_timeout_s: float = 180.0  # a busy machine imports Feast slowly
    profile_seconds: float = 10.0  # length of a py-spy recording when a target is missed
    # `fragmented`: the retrieval benchmark runs only its fragmented-history part (a day of
    # stream appends, before and after compaction), not the stock stores' comparison
    retrieval_only: Literal["", "fragmented"] = ""


@lru_cache
def get_settings() -> BenchSettings:
    apply_env_defaults()
    return BenchSettings()


def scratch_dir(prefix: str) -> Path:
    """A new scratch directory under `run_dir` (created first: a fresh checkout has none)."""
    run_dir = get_settings().run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=run_dir))


@dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does; `full()` is what `make bench` runs."""

    label: str
    # scoring
    score_rate: float  # open-loop arrivals per second
    score_duration_s: float
    score_warmup_s: float
    score_peak_duration_s: float
    score_connections: int
    # materialization (bench.materialize.run)
    materialize_entities: int
    # stream
    stream_events: int  # pre-loaded into the topic for the throughput run
    stream_users: int
    fresh_rate: float  # events/s produced open-loop during the freshness run
    fresh_duration_s: float
    push_events: int  # stock store.push(), unpaced sample
    push_window_s: float  # stock store.push() at fresh_rate: arrivals during this window
    # training retrieval
    retrieval_rows: int
    retrieval_stock_first: int  # first stock size; larger ones only if predicted to fit
    retrieval_stock_budget_s: float
    # Feast's Dask store spends minutes even on tiny entity frames (it tokenizes the feature
    # tables): it gets one small size and its own time limit.
    retrieval_dask_rows: int
    retrieval_dask_limit_s: float
    # offline engines (bench.offline_engines): retrieval on the faster engine at each size
    engine_scaling_rows: tuple[int, ...]
    # batch scoring
    batch_rows: int
    # soak (bench.soak): our scorer at a fixed open-loop rate
    soak_rate: float
    soak_duration_s: float

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            label="full", score_rate=1000, score_duration_s=30, score_warmup_s=5,
            score_peak_duration_s=20, score_connections=32, materialize_entities=1_000_000,
            stream_events=300_000, stream_users=20_000, fresh_rate=5000, fresh_duration_s=30,
            push_events=1000, push_window_s=0.5, retrieval_rows=1_000_000,
            retrieval_stock_first=20_000, retrieval_stock_budget_s=180, retrieval_dask_rows=2_000,
            retrieval_dask_limit_s=900, engine_scaling_rows=(1_000_000, 3_000_000, 10_000_000),
            batch_rows=10_000_000, soak_rate=1000, soak_duration_s=600,
        )

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            label="quick", score_rate=200, score_duration_s=5, score_warmup_s=2,
            score_peak_duration_s=5, score_connections=16, materialize_entities=10_000,
            stream_events=20_000, stream_users=2_000, fresh_rate=1000, fresh_duration_s=5,
            push_events=300, push_window_s=0.3, retrieval_rows=50_000,
            retrieval_stock_first=5_000, retrieval_stock_budget_s=45, retrieval_dask_rows=1_000,
            retrieval_dask_limit_s=120, engine_scaling_rows=(50_000, 150_000, 500_000),
            batch_rows=40_000, soak_rate=200, soak_duration_s=30,
        )
