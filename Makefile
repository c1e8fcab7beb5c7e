# The user's verbs. On a fresh machine `make demo` creates .venv, installs everything and runs the
# pipeline on the bundled sample; `make test` runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
FAISS ?= cpu# `make setup FAISS=gpu` on CUDA machines (faiss-gpu instead of faiss-cpu, never both)
PORT ?= 4200
ARGS ?=

PY := $(VENV)/bin/python
# Stage commands in dvc.yaml call `arcface`, so the venv's bin comes first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_LOGGING_EXTRA_LOGGERS := arcface
export PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW := ignore

.PHONY: setup demo test test-fast lint format repro serve stop run ui search-ui clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[$(FAISS),dev]"
	touch $@

setup: $(VENV)/.installed ## create .venv and install the project with its tested versions

demo: setup ## run the whole pipeline on the bundled sample (Prefect flow, DVC-tracked, MLflow-logged)
	$(PY) -m flows.train_and_eval $(ARGS)

test: setup ## all tests, end-to-end runs through real Prefect/DVC/MLflow included
	$(PY) -m pytest -q $(ARGS)

test-fast: setup ## the tests without the slow end-to-end server runs
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

repro: setup ## the same pipeline through DVC
	dvc repro $(ARGS)
	dvc metrics show

serve: setup ## local Prefect server on 127.0.0.1:$(PORT) + the process serving train-and-eval/local
	$(PY) -m flows.local_server start --port $(PORT)

stop: ## stop what `make serve` started
	$(PY) -m flows.local_server stop

run: setup ## run the served deployment, e.g. make run ARGS="-p overrides={\"train.epochs\":2}"
	PREFECT_API_URL=http://127.0.0.1:$(PORT)/api prefect deployment run train-and-eval/local --watch $(ARGS)

ui: setup ## MLflow UI on http://127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

search-ui: setup ## the search page on http://127.0.0.1:8000 over the pipeline's index (after make demo)
	arcface search-ui $(ARGS)

clean: ## remove pipeline outputs (not the venv, not mlflow.db)
	rm -rf data models reports
