# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The run folder of `make demo`, `make ui`, `tve` and `dg dev -w workspace.yaml` alike
RUN_DIR ?= $(CURDIR)/runs/demo

.PHONY: install system-packages demo test run results experiment ui mlflow-ui clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: `pip install torch==2.13.0` takes the CPU build from local disk; installing
# anything that depends on torch before it would let the resolver fetch CUDA wheels.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Debian's servers and browser that the tests start themselves: Redis (Celery broker),
# PostgreSQL (the shared Dagster instance), Chromium + ChromeDriver (the browser test).
DEB_PACKAGES := chromium chromium-driver redis-server postgresql
system-packages:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q $(DEB_PACKAGES) >/dev/null \
	    || { apt-get update -q >/dev/null && apt-get install -y -q $(DEB_PACKAGES) >/dev/null; }; \
	else echo "system-packages: needs root and apt-get (install: $(DEB_PACKAGES))"; exit 1; fi

demo: $(STAMP)
	$(BIN)/tve demo --run-dir "$(RUN_DIR)"

# ruff (lint, then format) before the suite: `make test` fails on either.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

# Any registered database: make run DATABASE=rel-f1 [RUN_DIR=...]; make results DATABASE=rel-f1
run: $(STAMP)
	$(BIN)/tve run "$(DATABASE)" --run-dir "$(RUN_DIR)"

results: $(STAMP)
	$(BIN)/tve results "$(DATABASE)" --run-dir "$(RUN_DIR)"

# An experiment as one Dagster backfill: make experiment DATABASE=rel-f1 [PRESET=cpu|full] [RUN_DIR=...]
PRESET ?= cpu
experiment: $(STAMP)
	$(BIN)/tve experiment "$(DATABASE)" --preset "$(PRESET)" --run-dir "$(RUN_DIR)"

# `dg dev` (dagster-dg-cli, a dependency) is Dagster 1.13's `dagster dev`, without its
# SupersessionWarning; `-w` loads workspace.yaml as `dagster dev -w` did. Ctrl-C stops the
# webserver, the daemon and the code server in about 9 s (README, "Dagster UI").
# A run folder without an instance yet (a fresh clone) gets the one `tve` writes (no telemetry,
# no sign-up dialog); the code location gives it the embedded database, rel-flights.
ui: $(STAMP)
	@test -f "$(RUN_DIR)/dagster/dagster.yaml" || $(BIN)/python -c \
	  "import sys; from assets.commands import prepare_run_dir; prepare_run_dir(sys.argv[1])" "$(RUN_DIR)"
	DAGSTER_HOME="$(RUN_DIR)/dagster" TVE_RUN_DIR="$(RUN_DIR)" $(BIN)/dg dev -w workspace.yaml

mlflow-ui: $(STAMP)
	@$(BIN)/python -c 'import sys; from resources.mlflow_tracking import experiment_link as e; \
	  print("The runs in the model-training view:", e(sys.argv[1]))' "sqlite:///$(RUN_DIR)/mlflow.db"
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$(RUN_DIR)/mlflow.db"

clean:
	rm -rf runs .pytest_cache
