"""The engine the offline tier runs on: DuckDB in this process (default) or Spark.

`OFFLINE_ENGINE=duckdb|spark` selects it for every offline job at once: the offline store's
point-in-time join (`feature_repo.offline_store.AsofOfflineStore`, hence
`training.retrieval.training_frame` and `training.batch_score`), the bulk materialization
engine's read of each key's latest row, and `training.batch_features`.  Same feature
definitions, same results (tests/integration/feature_repo/test_offline_engines.py).
"""

from feature_repo.offline_engines.config import ENGINES, OfflineEngineSettings, get_settings

__all__ = ["ENGINES", "OfflineEngineSettings", "get_settings"]
