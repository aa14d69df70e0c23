"""DuckDB offline store whose point-in-time join is an ASOF join (registered in the YAML).

Feast's DuckDB store joins every entity row with every feature row of the same key and then
keeps the newest one: O(rows per key^2), minutes for a million labelled transactions.  This
subclass answers `get_historical_features` for parquet file sources with DuckDB's
`ASOF LEFT JOIN`, a sort-merge join, and is otherwise Feast's own store.  Semantics are Feast's:
for an entity row at t, the feature row with the greatest timestamp <= t (ties broken by the
newest created timestamp), discarded when older than t - ttl; one output row per entity row,
in input order, duplicates kept.  Anything else (SQL entity frames,
`filter_by_created_timestamp`, non-file sources) falls back to the stock implementation.

`AsofOfflineStore` (the one feature_store.yaml registers) runs the same join on the engine
`OFFLINE_ENGINE` selects: DuckDB here, or Spark (`feature_repo.offline_engines.spark`, equal
row for row and value for value); the on-demand views run the same code after either.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast

import duckdb
import ibis
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from feast import FeatureView, FileSource
from feast.infra.offline_stores.duckdb import (
    DuckDBOfflineStore,
    DuckDBOfflineStoreConfig,
    _write_data_source,
)
from feast.infra.offline_stores.ibis import IbisRetrievalJob
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from feast.transformation.base import Transformation

from feature_repo.history import live_files
from feature_repo.offline_engines import get_settings as engine_settings
from feature_repo.offline_engines import spark
from feature_repo.offline_engines.plan import ViewJoin
from feature_repo.vectorised import twin_for

TS = "event_timestamp"


class AsofDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    type: Literal["feature_repo.offline_store.AsofDuckDBOfflineStore"] = (
        "feature_repo.offline_store.AsofDuckDBOfflineStore"
    )


class AsofOfflineStoreConfig(DuckDBOfflineStoreConfig):
    type: Literal["feature_repo.offline_store.AsofOfflineStore"] = (
        "feature_repo.offline_store.AsofOfflineStore"
    )


def source_files(source: FileSource) -> list[Path]:
    """The parquet files of a file source: the file, or for a history table
    (`feature_repo.history`) the files of its latest version.  Both engines read these."""
    path = Path(source.path)
    files = live_files(path) if path.is_dir() else [path]
    if not files:  # not a glob: a history table's directory also holds files it no longer has
        raise FileNotFoundError(f"no data files in {path}")
    return files


def _files(source: FileSource) -> str:
    """The source's parquet files as a DuckDB list, listed once, so that `file_index` names
    the same file in both passes of `asof_join` even if the stream commits meanwhile."""
    names = [str(f) for f in source_files(source)]
    quoted = ["'" + f.replace("'", "''") + "'" for f in names]
    return f"read_parquet([{', '.join(quoted)}])"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _supported(feature_views: list[FeatureView], entity_df: Any, by_created: bool) -> bool:
    return (
        isinstance(entity_df, pd.DataFrame)
        and TS in entity_df.columns
        and not by_created
        and all(isinstance(fv.batch_source, FileSource) for fv in feature_views)
    )


def _window(ts: pd.Series, column: str, ttl: timedelta | None) -> str:
    """SQL condition on a feature row's time keeping only rows some entity row can use: none
    newer than the newest entity row, none staler than `ttl` before the oldest."""
    if not len(ts):
        return "TRUE"
    cond = f"{column}::TIMESTAMPTZ <= TIMESTAMPTZ '{ts.max().isoformat()}'"
    if ttl:
        cond += f" AND {column}::TIMESTAMPTZ >= TIMESTAMPTZ '{(ts.min() - ttl).isoformat()}'"
    return cond


def asof_join(
    entity_df: pd.DataFrame,
    feature_views: list[FeatureView],
    feature_refs: list[str],
    full_feature_names: bool,
) -> pa.Table:
    """The point-in-time join; returns entity columns + features, in input order.

    Two passes over each source.  First DuckDB joins narrow columns only (join keys, times,
    file and row number of each feature row in the time window some entity row can use) and
    returns, per entity row and view, which feature row to use (null: none, or stale).  Then
    only those rows' feature values, array columns included, are read and put in place with
    Arrow `take`.  A day of entity rows thus reads the day's rows and one row per key before
    it, not the whole ttl window (30 days of velocity rows).
    """
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    ent = entity_df.copy()
    ent[TS] = pd.to_datetime(ent[TS], utc=True).astype("datetime64[us, UTC]")
    entities = pa.Table.from_pandas(ent, preserve_index=False).replace_schema_metadata(None)
    keys_of = [fv.projection.join_key_map or {e.name: e.name for e in fv.entity_columns}
               for fv in feature_views]
    joined = sorted({ek for keys in keys_of for ek in keys.values()})
    con.register("__entities", entities.select([*joined, TS]).append_column(
        "__row", pa.array(np.arange(len(ent), dtype=np.int64))))
    ctes, joins, selects, reads = [], [], [], []
    for i, fv in enumerate(feature_views):
        # a FileSource: callers pass only views that `_supported` accepted
        src, keys = cast(FileSource, fv.batch_source), keys_of[i]
        prefix = fv.projection.name_to_use()
        feats = [r.split(":", 1)[1] for r in feature_refs if r.startswith(prefix + ":")]
        ts_field, created = src.timestamp_field, src.created_timestamp_column
        window = _window(ent[TS], _q(ts_field), fv.ttl)
        files = _files(src)  # both passes read exactly these files
        cols = ", ".join([*(_q(k) for k in keys), f"{_q(ts_field)}::TIMESTAMPTZ AS __ts",
                          "file_index AS __fi, file_row_number AS __fr"])
        dedup = ""
        if created:
            cols += f", {_q(created)}::TIMESTAMPTZ AS __created"
            part = ", ".join([*(_q(k) for k in keys), "__ts"])
            dedup = f" QUALIFY row_number() OVER (PARTITION BY {part} ORDER BY __created DESC) = 1"
        ctes.append(f"f{i} AS (SELECT {cols} FROM {files} WHERE {window}{dedup})")
        on = " AND ".join(f"e.{_q(ek)} = f{i}.{_q(k)}" for k, ek in keys.items())
        joins.append(f"ASOF LEFT JOIN f{i} ON {on} AND e.{TS} >= f{i}.__ts")
        fresh = (f"f{i}.__ts >= e.{TS} - INTERVAL {int(fv.ttl.total_seconds() * 1e6)} MICROSECONDS"
                 if fv.ttl else "TRUE")
        selects.append(f"CASE WHEN {fresh} THEN (f{i}.__fi::BIGINT << 40) + f{i}.__fr END "
                       f"AS __rid{i}")
        base = fv.projection.name_alias or fv.name
        reads.append((f"SELECT (file_index::BIGINT << 40) + file_row_number AS __rid, "
                      f"{', '.join(_q(f) for f in feats)} FROM {files} WHERE {window}",
                      feats, [f"{base}__{f}" if full_feature_names else f for f in feats]))
    table = entities
    if reads:
        rids = con.sql(f"WITH {', '.join(ctes)} SELECT e.__row, {', '.join(selects)} "
                       f"FROM __entities e {' '.join(joins)}").to_arrow_table()
        back = pc.sort_indices(rids["__row"])  # input order, without sorting in the join
        jobs = []
        for i, (sql, feats, names) in enumerate(reads):
            rid = rids[f"__rid{i}"].take(back).combine_chunks()
            con.register("__wanted", pa.table({"__rid": pc.unique(rid.drop_null())}))
            rows = con.sql(f"{sql} AND __rid IN (SELECT __rid FROM __wanted)").to_arrow_table()
            con.unregister("__wanted")
            # the position in `rows` of each entity row's feature row (null stays null)
            order = pc.sort_indices(rows["__rid"])
            pos = pc.take(order, pc.index_in(rid, value_set=pc.take(rows["__rid"], order)))
            jobs += [(rows[f], pos, name) for f, name in zip(feats, names, strict=True)]
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # Arrow's take releases the GIL
            for name, values in zip([j[2] for j in jobs],
                                    pool.map(lambda j: j[0].take(j[1]), jobs), strict=True):
                table = table.append_column(name, values)
    con.close()
    return table


def _entity_table(entity_df: pd.DataFrame) -> pa.Table:
    ent = entity_df.copy()
    ent[TS] = pd.to_datetime(ent[TS], utc=True).astype("datetime64[us, UTC]")
    return pa.Table.from_pandas(ent, preserve_index=False).replace_schema_metadata(None)


def view_joins(
    feature_views: list[FeatureView], feature_refs: list[str], full_feature_names: bool
) -> list[ViewJoin]:
    """Each (file-sourced) view's part of the join: files, keys, times, ttl, features."""
    plans = []
    for fv in feature_views:
        src = cast(FileSource, fv.batch_source)
        files = source_files(src)
        prefix = fv.projection.name_to_use()
        feats = [r.split(":", 1)[1] for r in feature_refs if r.startswith(prefix + ":")]
        base = fv.projection.name_alias or fv.name
        plans.append(ViewJoin(
            files=files,
            keys=fv.projection.join_key_map or {e.name: e.name for e in fv.entity_columns},
            timestamp_field=src.timestamp_field,
            created_field=src.created_timestamp_column or None,
            ttl=fv.ttl,
            features=feats,
            names=[f"{base}__{f}" if full_feature_names else f for f in feats],
        ))
    return plans


def spark_asof_join(
    entity_df: pd.DataFrame,
    feature_views: list[FeatureView],
    feature_refs: list[str],
    full_feature_names: bool,
) -> pa.Table:
    """`asof_join` on Spark (`feature_repo.offline_engines.spark`): the same table."""
    plans = view_joins(feature_views, feature_refs, full_feature_names)
    table = _entity_table(entity_df)
    joined = sorted({ek for p in plans for ek in p.keys.values()})
    for part in spark.asof_join(table.select([*joined, TS]), plans):
        for name in part.column_names:
            table = table.append_column(name, part[name])
    return table


Join = Callable[[pd.DataFrame, list[FeatureView], list[str], bool], pa.Table]
"""A point-in-time join: (entity rows, views, feature refs, full names) -> the joined table."""

JOINS: dict[str, Join] = {
    "duckdb": asof_join,
    "spark": spark_asof_join,
}
"""The point-in-time join of each `OFFLINE_ENGINE`."""


class _AsofRetrievalJob(IbisRetrievalJob):
    """Applies the on-demand views itself, on exactly the columns each one reads.

    Feast's python-mode transformation converts the whole joined table (every array column)
    to Python objects once per on-demand view.  Here a view with a vectorised twin
    (`feature_repo.vectorised`, equal to its UDF bit for bit) is computed by the twin; any other
    view, or a table the twin declines, goes to the registry's own UDF on its input columns only.
    """

    def __init__(self, table: pa.Table, odfvs: list[OnDemandFeatureView], **kwargs: Any):
        super().__init__(ibis.memtable(table), [], **kwargs)
        self._arrow = table
        self._odfvs = odfvs

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        table = self._arrow
        for odfv in self._odfvs:
            needed = [f.name for proj in odfv.source_feature_view_projections.values()
                      for f in proj.features]
            needed += [f.name for rs in odfv.source_request_sources.values() for f in rs.schema]
            cols = [c for c in dict.fromkeys(needed) if c in table.column_names]
            twin = twin_for(odfv)
            out = None
            if odfv.mode != "python" or len(cols) != len(set(needed)):
                out = odfv.transform_arrow(table, self.full_feature_names)
            elif twin is not None:
                out = twin(table.select(cols))
            if out is None:
                out = pa.Table.from_pydict(  # python mode: Feast validated the transformation
                    cast(Transformation, odfv.feature_transformation).udf(
                        table.select(cols).to_pydict())
                )
            for name in out.column_names:
                if name not in table.column_names:
                    table = table.append_column(name, out[name])
        return table

    def to_df(self, validation_reference: Any = None, timeout: int | None = None) -> pd.DataFrame:
        # Feast's ends in reset_index(drop=True): a full copy of a frame that has a RangeIndex
        return self.to_arrow(validation_reference=validation_reference, timeout=timeout).to_pandas()

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._to_arrow_internal(timeout).to_pandas()


def _retrieve(
    join: Join,
    config: RepoConfig,
    feature_views: list[FeatureView],
    feature_refs: list[str],
    entity_df: pd.DataFrame | str,
    registry: BaseRegistry,
    project: str,
    full_feature_names: bool,
    filter_by_created_timestamp: bool,
) -> RetrievalJob:
    """`get_historical_features` with `join` for the point-in-time join; anything `_supported`
    declines goes to Feast's DuckDB store."""
    if not _supported(feature_views, entity_df, filter_by_created_timestamp):
        return DuckDBOfflineStore.get_historical_features(
            config, feature_views, feature_refs, entity_df, registry, project,
            full_feature_names, filter_by_created_timestamp,
        )
    assert isinstance(entity_df, pd.DataFrame)  # noqa: S101 - narrowed by _supported
    table = join(entity_df, feature_views, feature_refs, full_feature_names)
    odfvs = OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry)
    ts = pd.to_datetime(entity_df[TS], utc=True)
    return _AsofRetrievalJob(
        table,
        [fv for fv in odfvs if fv.mode != "substrait"],
        full_feature_names=full_feature_names,
        metadata=RetrievalMetadata(
            features=feature_refs,
            keys=list(set(entity_df.columns) - {TS}),
            min_event_timestamp=ts.min().to_pydatetime() if len(ts) else None,
            max_event_timestamp=ts.max().to_pydatetime() if len(ts) else None,
        ),
        data_source_writer=_write_data_source,
        staging_location=None,
        staging_location_endpoint_override=None,
        repo_path=str(config.repo_path),
    )


class AsofDuckDBOfflineStore(DuckDBOfflineStore):
    """Feast's DuckDB offline store with an ASOF point-in-time join (see module docstring)."""

    @classmethod
    def get_historical_features(
        cls,
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str,
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        return _retrieve(cls.point_in_time_join(), config, feature_views, feature_refs,
                         entity_df, registry, project, full_feature_names,
                         filter_by_created_timestamp)

    @staticmethod
    def point_in_time_join() -> Join:
        """The join this store runs: DuckDB's ASOF join."""
        return asof_join


class AsofOfflineStore(AsofDuckDBOfflineStore):
    """The store feature_store.yaml registers: the point-in-time join runs on the engine
    `OFFLINE_ENGINE` names (`JOINS`: DuckDB's ASOF join, or Spark's); the on-demand views,
    fallbacks and every other method are the DuckDB store's.  Feast expands `${VAR}` only in
    YAML values, so the engine is read here, when a retrieval starts."""

    @staticmethod
    def point_in_time_join() -> Join:
        return JOINS[engine_settings().engine]
