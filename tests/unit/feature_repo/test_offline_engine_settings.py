"""OFFLINE_ENGINE and the OFFLINE_SPARK_* settings, read from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from feature_repo.offline_engines import OfflineEngineSettings


def test_duckdb_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OFFLINE_ENGINE", raising=False)
    s = OfflineEngineSettings()
    assert s.engine == "duckdb" and s.spark_master == "local[2]"


def test_spark_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLINE_ENGINE", "spark")
    monkeypatch.setenv("OFFLINE_SPARK_MASTER", "spark://head:7077")
    monkeypatch.setenv("OFFLINE_SPARK_SHUFFLE_PARTITIONS", "200")
    monkeypatch.setenv("OFFLINE_SPARK_CONF", '{"spark.executor.memory": "8g"}')
    s = OfflineEngineSettings()
    assert (s.engine, s.spark_master, s.spark_shuffle_partitions) == (
        "spark", "spark://head:7077", 200)
    assert s.spark_conf == {"spark.executor.memory": "8g"}


@pytest.mark.parametrize("name, value", [("OFFLINE_ENGINE", "ray"),
                                         ("OFFLINE_SPARK_SHUFFLE_PARTITIONS", "0"),
                                         ("OFFLINE_SPARK_CONF", "not json")])
def test_a_wrong_value_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, name: str,
                                          value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises((ValidationError, ValueError), match=name.removeprefix("OFFLINE_")
                       .lower()):
        OfflineEngineSettings()
