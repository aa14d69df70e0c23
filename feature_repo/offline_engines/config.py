"""Settings of the offline engine, from the environment (`OFFLINE_*`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENGINES = ("duckdb", "spark")


class OfflineEngineSettings(BaseSettings):
    """`OFFLINE_ENGINE` and the Spark session it opens.

    A wrong value stops the job at start with pydantic's message naming the variable.
    """

    model_config = SettingsConfigDict(env_prefix="OFFLINE_")

    engine: Literal["duckdb", "spark"] = "duckdb"
    spark_master: str = "local[2]"
    """`spark://host:7077`, `k8s://...`, `yarn`: where the Spark jobs run."""
    spark_driver_memory: str = "2g"
    spark_shuffle_partitions: int = Field(default=4, gt=0)
    """`spark.sql.shuffle.partitions`: a few per core here; hundreds on a cluster."""
    spark_conf: dict[str, str] = {}
    """Any other Spark settings, as JSON (`OFFLINE_SPARK_CONF='{"spark.executor.memory":
    "8g"}'`), e.g. object storage credentials for s3a:// paths."""


@lru_cache
def get_settings() -> OfflineEngineSettings:
    return OfflineEngineSettings()
