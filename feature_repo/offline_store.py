"""DuckDB offline store whose point-in-time join is an ASOF join (registered in the YAML).

Feast's DuckDB store joins every entity row with every feature row of the same key and then
keeps the newest one: O(rows per key^2), minutes for a million labelled transactions.  This
subclass answers `get_historical_features` for parquet file sources with DuckDB's
`ASOF LEFT JOIN`, a sort-merge join, and is otherwise Feast's own store.  Semantics are Feast's:
for an entity row at t, the feature row with the greatest timestamp <= t (ties broken by the
newest created timestamp), discarded when older than t - ttl; one output row per entity row,
in input order, duplicates kept.  Anything else (SQL entity frames,
`filter_by_created_timestamp`, non-file sources) falls back to the stock implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import duckdb
import ibis
import pandas as pd
import pyarrow as pa
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

TS = "event_timestamp"


class AsofDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    type: Literal["feature_repo.offline_store.AsofDuckDBOfflineStore"] = (  # type: ignore[assignment]
        "feature_repo.offline_store.AsofDuckDBOfflineStore"
    )


def _parquet_expr(source: FileSource) -> str:
    path = Path(source.path)
    target = f"{path}/**/*.parquet" if path.is_dir() else str(path)
    return "read_parquet('" + target.replace("'", "''") + "')"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _supported(feature_views: list[FeatureView], entity_df: Any, by_created: bool) -> bool:
    return (
        isinstance(entity_df, pd.DataFrame)
        and TS in entity_df.columns
        and not by_created
        and all(isinstance(fv.batch_source, FileSource) for fv in feature_views)
    )


def asof_join(
    entity_df: pd.DataFrame,
    feature_views: list[FeatureView],
    feature_refs: list[str],
    full_feature_names: bool,
) -> pa.Table:
    """The point-in-time join as one DuckDB query; returns entity columns + features."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    ent = entity_df.copy()
    ent[TS] = pd.to_datetime(ent[TS], utc=True).astype("datetime64[us, UTC]")
    ent["__row"] = range(len(ent))
    con.register("__entities", pa.Table.from_pandas(ent, preserve_index=False))
    ctes, joins, selects = [], [], []
    for i, fv in enumerate(feature_views):
        src = fv.batch_source
        prefix = fv.projection.name_to_use()
        feats = [r.split(":", 1)[1] for r in feature_refs if r.startswith(prefix + ":")]
        keys = fv.projection.join_key_map or {e.name: e.name for e in fv.entity_columns}
        ts_field, created = src.timestamp_field, src.created_timestamp_column
        cols = ", ".join([*(_q(k) for k in keys), f"{_q(ts_field)}::TIMESTAMPTZ AS __ts",
                          *(_q(f) for f in feats)])
        dedup = ""
        if created:
            cols += f", {_q(created)}::TIMESTAMPTZ AS __created"
            part = ", ".join([*(_q(k) for k in keys), "__ts"])
            dedup = f" QUALIFY row_number() OVER (PARTITION BY {part} ORDER BY __created DESC) = 1"
        ctes.append(f"f{i} AS (SELECT {cols} FROM {_parquet_expr(src)}{dedup})")
        on = " AND ".join(f"e.{_q(ek)} = f{i}.{_q(k)}" for k, ek in keys.items())
        joins.append(f"ASOF LEFT JOIN f{i} ON {on} AND e.{TS} >= f{i}.__ts")
        fresh = (f"f{i}.__ts >= e.{TS} - INTERVAL {int(fv.ttl.total_seconds() * 1e6)} MICROSECONDS"
                 if fv.ttl else "TRUE")
        base = fv.projection.name_alias or fv.name
        for f in feats:
            out = f"{base}__{f}" if full_feature_names else f
            selects.append(f"CASE WHEN {fresh} THEN f{i}.{_q(f)} END AS {_q(out)}")
    entity_cols = ", ".join(f"e.{_q(c)}" for c in entity_df.columns)
    sql = (f"WITH {', '.join(ctes)} SELECT {entity_cols}, {', '.join(selects)} "
           f"FROM __entities e {' '.join(joins)} ORDER BY e.__row")
    table = con.sql(sql).to_arrow_table()
    con.close()
    return table


class _AsofRetrievalJob(IbisRetrievalJob):
    """Applies the on-demand views itself, converting only each view's inputs to Python.

    Feast's python-mode transformation converts the whole joined table (every array column)
    to Python objects once per on-demand view; the UDFs called here are the registry's own,
    on exactly the columns they read, so the output is identical.
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
            if odfv.mode != "python" or len(cols) != len(set(needed)):
                out = odfv.transform_arrow(table, self.full_feature_names)
            else:
                out = pa.Table.from_pydict(
                    odfv.feature_transformation.udf(table.select(cols).to_pydict())  # type: ignore[attr-defined]
                )
            for name in out.column_names:
                if name not in table.column_names:
                    table = table.append_column(name, out[name])
        return table

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._to_arrow_internal(timeout).to_pandas()


class AsofDuckDBOfflineStore(DuckDBOfflineStore):
    """Feast's DuckDB offline store with an ASOF point-in-time join (see module docstring)."""

    @staticmethod
    def get_historical_features(  # type: ignore[override]
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str,
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        if not _supported(feature_views, entity_df, filter_by_created_timestamp):
            return DuckDBOfflineStore.get_historical_features(
                config, feature_views, feature_refs, entity_df, registry, project,
                full_feature_names, filter_by_created_timestamp,
            )
        assert isinstance(entity_df, pd.DataFrame)  # noqa: S101 - narrowed by _supported
        table = asof_join(entity_df, feature_views, feature_refs, full_feature_names)
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
