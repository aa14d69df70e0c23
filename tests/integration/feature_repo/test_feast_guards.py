"""Guards against drift from Feast: where this project re-implements a Feast path for speed,
the stock path must give the same answer on the same rows.

* The ASOF offline store (`feature_repo.offline_store`) against Feast's own DuckDB offline
  store: the same `get_historical_features` call, cell for cell.
* The scorer's online reader (`scoring.features.OnlineFeatures`: one pipelined Redis read and
  its own decoding, then the on-demand views) against Feast's `get_online_features`.
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from feast import FeatureStore

from feature_repo.config import REPO_DIR
from feature_repo.contract import request_fields
from scoring.features import OnlineFeatures
from scoring.scorer import model_row
from tests.conftest import SIM_END
from training.retrieval import labelled_entity_frame

pytestmark = pytest.mark.integration

SERVICE = "fraud_model_v1"


def _stock_duckdb_store(tmp: Path) -> FeatureStore:
    conf = yaml.safe_load((REPO_DIR / "feature_store.yaml").read_text())
    conf["offline_store"] = {"type": "duckdb"}
    path = tmp / "feature_store.yaml"
    path.write_text(yaml.safe_dump(conf))
    return FeatureStore(repo_path=str(REPO_DIR), fs_yaml_file=path)


def _equal_frames(ours: pd.DataFrame, stock: pd.DataFrame, names: list[str]) -> dict[str, int]:
    """Columns that differ (rows differing in each), NaN equal to NaN, floats to 1e-12."""
    differing = {}
    for name in names:
        a, b = ours[name], stock[name]
        if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            same = np.isclose(a.to_numpy("float64"), b.to_numpy("float64"), rtol=1e-12, atol=0,
                              equal_nan=True)
        else:
            same = (a.astype(str) == b.astype(str)).to_numpy()
        if not same.all():
            differing[name] = int((~same).sum())
    return differing


def test_asof_offline_store_equals_feasts_duckdb_join(materialized_store: Any) -> None:
    entities = labelled_entity_frame().sample(400, random_state=5).reset_index(drop=True)
    service = materialized_store.get_feature_service(SERVICE)
    ours = materialized_store.get_historical_features(entity_df=entities, features=service).to_df()
    with tempfile.TemporaryDirectory() as tmp:
        stock_store = _stock_duckdb_store(Path(tmp))
        stock = stock_store.get_historical_features(
            entity_df=entities, features=stock_store.get_feature_service(SERVICE)).to_df()
    assert len(ours) == len(stock) == len(entities)
    ours = ours.set_index("transaction_id").loc[entities["transaction_id"]]
    stock = stock.set_index("transaction_id").loc[entities["transaction_id"]]
    names = [f.name for p in service.feature_view_projections for f in p.features]
    assert _equal_frames(ours, stock, names) == {}
    assert ours[names].notna().to_numpy().sum() > 0.5 * ours[names].size  # not all missing


def test_scorer_online_reader_equals_feasts_get_online_features(materialized_store: Any) -> None:
    at = datetime(SIM_END.year, SIM_END.month, SIM_END.day, tzinfo=UTC)
    tx = labelled_entity_frame()
    users = list(tx["user_id"].drop_duplicates().sample(60, random_state=3)) + ["u-never-seen"]
    merchants = list(tx["merchant_id"].drop_duplicates().sample(61, replace=True, random_state=4))
    rows = [{"user_id": u, "merchant_id": m,
             **request_fields(at, 10.0 + 7 * i, m, ("online", "atm", "card_present")[i % 3])}
            for i, (u, m) in enumerate(zip(users, merchants, strict=True))]
    features = OnlineFeatures(materialized_store, SERVICE)
    vectors = features.assemble(rows, asyncio.run(features.fetch_async(rows)))
    service = materialized_store.get_feature_service(SERVICE)
    stock = materialized_store.get_online_features(features=service, entity_rows=rows).to_dict()
    compared = 0
    for name in features.output:
        for i, vec in enumerate(vectors):
            if name in vec.stale:  # outside the TTL: we say missing, Feast (no TTL) a value
                continue
            ours, theirs = vec.values[name], stock[name][i]
            if ours is None or (isinstance(ours, float) and np.isnan(ours)):
                assert theirs is None or (isinstance(theirs, float) and np.isnan(theirs)), (
                    name, rows[i]["user_id"], ours, theirs)
            else:
                assert ours == pytest.approx(theirs, rel=1e-12, abs=0), (name, i, ours, theirs)
                compared += 1
    assert compared > len(rows) * len(features.output) // 2
    # Feast's own `online_read` (the scorer's other path, `fetch`) assembled: the same vectors
    # as the column reads, and each vector's model row is `model_row`'s, bit for bit
    # (a third of the rows a year later: their stored rows are past the TTL, stale)
    later = at + timedelta(days=365)
    rows = [r if i % 3 else {**r, **request_fields(later, r["txn_amount"], r["merchant_id"],
                                                   r["txn_channel"])}
            for i, r in enumerate(rows)]
    # cards and merchants again, at other times: each distinct key is read once
    rows += [{**r, **request_fields(at - timedelta(hours=i), 1.0 + i, r["merchant_id"],
                                    "online")} for i, r in enumerate(rows[:15])]
    assert len({r["user_id"] for r in rows}) < len(rows)
    features = OnlineFeatures(materialized_store, SERVICE)  # its client on a new event loop
    vectors = features.assemble(rows, asyncio.run(features.fetch_async(rows)))
    via_feast = features.assemble(rows, features.fetch(rows))
    assert [_comparable(v) for v in via_feast] == [_comparable(v) for v in vectors]
    assert any(v.missing for v in vectors) and any(v.stale for v in vectors)
    for vec in [*vectors, *via_feast]:
        assert vec.input_names is features.output and vec.inputs is not None
        expected = np.array(model_row(vec, features.output), dtype=np.float64)
        assert vec.inputs.tobytes() == expected.tobytes()


def _comparable(vec: Any) -> tuple[object, ...]:
    """A vector's values (NaN as a string: NaN equals nothing), ages, missing and stale."""
    values = {k: "nan" if isinstance(v, float) and v != v else v for k, v in vec.values.items()}
    return values, vec.ages, vec.missing, vec.stale
