"""`training_frame` returns what a model needs: keys, request fields, labels and model inputs."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from scoring.artifact import service_feature_names
from training.retrieval import labelled_entity_frame, training_frame

SERVICE = "fraud_model_v1"
# inputs of the velocity on-demand view, stored in user_velocity_fv: not model inputs
VELOCITY_ARRAYS = {"recent_txn_ts", "recent_amounts", "recent_merchants", "known_merchants"}


@pytest.mark.integration
def test_training_frame_has_no_raw_columns_unless_asked(store: Any) -> None:
    entities = labelled_entity_frame().head(300)
    features = service_feature_names(store.get_feature_service(SERVICE))
    frame = training_frame(store, SERVICE, entities)
    assert list(frame.columns) == [*entities.columns, *features]
    assert not VELOCITY_ARRAYS & set(frame.columns)
    assert frame["transaction_id"].tolist() == entities["transaction_id"].tolist()

    raw = training_frame(store, SERVICE, entities, raw=True)
    assert VELOCITY_ARRAYS <= set(raw.columns) - set(frame.columns)
    pd.testing.assert_frame_equal(raw[frame.columns], frame)
