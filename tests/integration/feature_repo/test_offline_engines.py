"""OFFLINE_ENGINE=spark gives what DuckDB gives: equality, not similarity.

* Training frames: the `fraud_model_v1` frame with every raw column (velocity arrays
  included) of the session's data, on both engines, equal cell for cell (the point-in-time
  oracle tests in test_point_in_time.py also run on both: see its `service_frame`).
* Materialization: the synthetic repo of test_materialization_engine (every value type,
  created-time ties, nulls, rows outside the window, a directory source) and the real repo
  (its Delta history) materialized by the bulk engine reading through DuckDB and through
  Spark into two Redis databases: every hash identical.
* Batch scores: `training.batch_score` on both engines, identical output files.
* Both engines read a Delta history table's current files, not the files left on disk.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, String

from feature_repo import history
from feature_repo.materialization import ENGINE_TYPE
from feature_repo.offline_engines import spark
from feature_repo.offline_store import JOINS
from tests.conftest import PROJECT, SIM_END
from tests.fixtures.engines import ENGINE_PARAMS, offline_engine
from tests.integration.feature_repo.test_materialization_engine import (
    BASE,
    END,
    START,
    _base_url,
    _hashes,
    _narrow_tables,
    _open,
    _views,
    _wide_table,
)
from training import batch_score
from training.retrieval import labelled_entity_frame, training_frame

pytestmark = pytest.mark.slow
DUCK_DB, SPARK_DB = 6, 7  # this module's Redis databases


@pytest.fixture()
def spark_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the Spark functions called (so a test knows Spark really ran)."""
    calls: list[str] = []
    for name in ("asof_join", "latest_rows"):
        real = getattr(spark, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(spark, name, spy)
    return calls


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """Array cells as lists (pandas compares them then), everything else as it is."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object and any(isinstance(v, np.ndarray) for v in out[col]):
            out[col] = out[col].map(lambda v: None if v is None else v.tolist())
    return out


def test_training_frames_are_equal(store: Any, spark_calls: list[str]) -> None:
    entities = labelled_entity_frame()
    entities = entities.iloc[np.random.default_rng(3).permutation(len(entities))[:1000]]
    frames = {}
    for engine in ("duckdb", "spark"):
        with offline_engine(engine):
            frames[engine] = training_frame(store, "fraud_model_v1", entities, raw=True)
        assert spark_calls == ([] if engine == "duckdb" else ["asof_join"])
    duck, spark = frames["duckdb"], frames["spark"]
    assert list(spark.columns) == list(duck.columns)
    assert duck["recent_txn_ts"].map(lambda v: v is not None and len(v) > 0).mean() > 0.5
    assert duck["user_txn_count_30d"].notna().mean() > 0.5
    pd.testing.assert_frame_equal(_comparable(spark), _comparable(duck), check_exact=True)


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_the_join_reads_the_history_tables_current_files_only(tmp_path: Path,
                                                              engine: str) -> None:
    """After a replace commit the old rows' file stays on disk (until vacuum): a reader of the
    directory would see both versions; each engine sees only the table's current one."""
    ts = pd.Timestamp("2026-10-01 12:00", tz="UTC")
    def rows(at: pd.Timestamp, values: list[float]) -> pa.Table:
        return pa.table({"user_id": ["u1", "u2"],
                         "event_timestamp": pa.array([at, at], pa.timestamp("us", "UTC")),
                         "v": values})

    # the replaced rows are the newer ones: a reader of every file on disk would return them
    old, new = rows(ts + timedelta(minutes=30), [1.0, 2.0]), rows(ts, [10.0, 20.0])
    table, staged = tmp_path / "history", tmp_path / "staged"
    history.append(table, old, history.BACKFILL)
    history.append(staged, new, history.BACKFILL)
    history.replace(table, staged, history.BACKFILL)
    on_disk = sorted(table.glob("**/*.parquet"))
    assert len(on_disk) > len(history.live_files(table))  # the replaced file is still there
    view = FeatureView(
        name="h_fv", entities=[Entity(name="user", join_keys=["user_id"],
                                      value_type=ValueType.STRING)],
        ttl=timedelta(days=1),
        schema=[Field(name="user_id", dtype=String), Field(name="v", dtype=Float64)],
        source=FileSource(name="h_source", path=str(table), timestamp_field="event_timestamp"),
    )
    entities = pd.DataFrame({"user_id": ["u1", "u2", "u3"],
                             "event_timestamp": [ts + timedelta(hours=1)] * 3})
    out = JOINS[engine](entities, [view], ["h_fv:v"], False).to_pandas()
    assert out["v"].tolist()[:2] == [10.0, 20.0] and pd.isna(out["v"].iloc[2])


# --- materialization ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("engines")
    rng = np.random.default_rng(21)
    data = root / "data"
    (data / "narrow").mkdir(parents=True)
    pq.write_table(_wide_table(rng), data / "wide.parquet", row_group_size=2500)
    for i, part in enumerate(_narrow_tables(rng)):
        pq.write_table(part, data / "narrow" / f"part-{i}.parquet")
    objects, _, _ = _views(data)
    stores = {"duckdb": _open(root, "duckdb", ENGINE_TYPE, DUCK_DB),
              "spark": _open(root, "spark", ENGINE_TYPE, SPARK_DB)}
    for s in stores.values():
        s.apply(objects)
    clients = {"duckdb": redis.Redis.from_url(f"{_base_url()}/{DUCK_DB}"),
               "spark": redis.Redis.from_url(f"{_base_url()}/{SPARK_DB}")}
    yield {"stores": stores, "redis": clients}
    for client in clients.values():
        client.flushdb()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("window", ["all", "part"])
def test_materialized_rows_are_identical(synthetic: dict[str, Any], window: str,
                                         spark_calls: list[str]) -> None:
    start, end = (START, END) if window == "all" else (BASE + (END - BASE) / 4, BASE
                                                      + (END - BASE) / 2)
    for engine, s in synthetic["stores"].items():
        synthetic["redis"][engine].flushdb()
        with offline_engine(engine):
            s.materialize(start_date=start, end_date=end)
    assert spark_calls == ["latest_rows"] * 2  # both views, read by Spark
    on_duck, on_spark = (_hashes(synthetic["redis"][e]) for e in ("duckdb", "spark"))
    assert len(on_duck) > (3000 if window == "all" else 500)
    assert on_spark == on_duck


def test_repo_views_materialize_identically_on_both_engines(
    store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spark_calls: list[str]
) -> None:
    """The session's data (profiles, the velocity history's Delta table) through the repo's
    own feature_store.yaml, once per engine."""
    end = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
    hashes = {}
    for engine, db in (("duckdb", DUCK_DB), ("spark", SPARK_DB)):
        monkeypatch.setenv("REDIS_URL", f"{_base_url()}/{db}")  # read when the config loads
        repo_store = FeatureStore(repo_path=str(PROJECT / "feature_repo"))
        client = redis.Redis.from_url(f"{_base_url()}/{db}")
        client.flushdb()
        try:
            with offline_engine(engine):
                repo_store.materialize(start_date=START, end_date=end)
            hashes[engine] = _hashes(client)
        finally:
            client.flushdb()
    assert spark_calls == ["latest_rows"] * 3  # profiles and the velocity history
    assert len(hashes["duckdb"]) > 300
    assert hashes["spark"] == hashes["duckdb"]


# --- batch scoring ------------------------------------------------------------------------


def _scores(out: Path) -> pa.Table:
    files = sorted(out.glob("date=*/*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return table.sort_by("transaction_id")


def test_batch_scores_are_identical(trained_artifact: Path, tmp_path: Path,
                                    spark_calls: list[str]) -> None:
    tx_days = sorted((Path(os.environ["FRAUD_DATA_DIR"]) / "transactions").glob("date=*"))
    start = datetime.fromisoformat(tx_days[-3].name[5:]).date()
    tables = {}
    for engine in ("duckdb", "spark"):
        with offline_engine(engine):
            batch_score.run(tmp_path / engine, start, None, chunk_rows=100_000,
                            model_path=trained_artifact, progress=False)
        tables[engine] = _scores(tmp_path / engine)
        assert bool(spark_calls) == (engine == "spark")
    assert tables["duckdb"].num_rows > 500
    assert tables["spark"].equals(tables["duckdb"])
