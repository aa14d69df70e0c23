-- The MLflow model registry's database (MODEL_REGISTRY_URL in docker-compose.yml), next to the
-- Feast registry's `feast`.  Runs once, when the postgres volume is first initialised; MLflow
-- creates its tables at first use (the `init` service).
CREATE DATABASE mlflow OWNER fraud;
