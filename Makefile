# fraudstream: feature-store-backed real-time scoring.  `make help` lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
FEAST  := $(VENV)/bin/feast -c feature_repo
PYTHON ?= python3

# Connection settings (override in the environment).  The feature repo, jobs, scorer,
# dataflows and tests all read these names.
export REDIS_URL               ?= redis://127.0.0.1:6379/0
export KAFKA_BOOTSTRAP_SERVERS ?= 127.0.0.1:9092
export FRAUD_DATA_DIR          ?= $(CURDIR)/data
export FEAST_REGISTRY_URL      ?= sqlite:///$(FRAUD_DATA_DIR)/registry.db

.PHONY: help setup lock up down simulate features apply materialize train serve stream produce stream-score demo test test-fast lint bench soak clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-12s\033[0m %s\n",$$1,$$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed ## create the virtualenv and install pinned dependencies

lock: ## regenerate constraints.txt from the current virtualenv
	$(VENV)/bin/pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

up: setup ## start local services not already running (Kafka-protocol broker, Redis if none) and create topics
	$(PY) -m devenv.services up

down: setup ## stop the services `make up` started
	$(PY) -m devenv.services down

simulate: setup ## write the simulated transaction log and labels under $FRAUD_DATA_DIR
	$(PY) -m training.simulate

features: setup ## batch feature job (daily profiles) and velocity backfill into the offline store
	$(PY) -m training.batch_features
	$(PY) -m streaming.backfill

apply: setup ## feast apply (registers entities, views and services)
	$(FEAST) apply

materialize: setup ## feast materialize-incremental up to now into Redis
	$(FEAST) materialize-incremental $$(date -u +%Y-%m-%dT%H:%M:%S)

train: setup ## train the fraud model from point-in-time features and write a versioned artifact
	$(PY) -m training.train

serve: setup ## start the FastAPI scorer (SERVING_* settings)
	$(PY) -m serving

.PHONY: skew-audit batch-score
skew-audit: setup ## compare the scorer's prediction log with point-in-time features; skew + drift report
	$(PY) -m training.skew_audit

batch-score: setup ## score the transaction log from the watermark on (first run: make batch-score START=YYYY-MM-DD)
	$(PY) -m training.batch_score $(if $(START),--start $(START))

.PHONY: stream produce compact
stream: setup ## run the feature dataflow on Kafka: python -m streaming.features
	$(PY) -m streaming.features

compact: setup ## compact the offline-history Delta table (Delta optimize + vacuum; safe while streaming and training)
	$(PY) -m training.compact_history

produce: setup ## replay the simulated log to Kafka: python -m streaming.produce replay --speedup 0
	$(PY) -m streaming.produce replay --speedup 0

stream-score: setup ## run the streaming scorer on Kafka: transactions -> predictions, fraud-alerts
	$(PY) -m streaming.score

demo: setup ## run the whole system end to end on this machine and print a summary
	$(PY) -m devenv.demo

test: setup ## run the whole test suite: tests/unit and tests/integration (real Redis, broker, Feast)
	$(PY) -m pytest -q

test-fast: setup ## the unit tier only: fast and hermetic (tests/unit)
	$(PY) -m pytest -q tests/unit

lint: setup ## ruff, mypy and the package layering check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy feature_repo scoring serving streaming training devenv
	$(PY) -m devenv.layers

bench: setup ## run the benchmarks (soak included) and write reports/bench.md
	$(PY) -m bench

soak: setup ## scorer soak only: 10 min at 1,000 req/s, errors and memory -> reports/bench-soak.md
	$(PY) -m bench soak

clean: ## remove generated data, artifacts and reports
	rm -rf data artifacts reports .run
