# The two commands: `make demo` and `make test`. Both create .venv and install on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Quiet, offline-friendly defaults (no usage stats, no telemetry). Ray's token authentication
# keeps its default (on) for everything a user runs; only the test suite's own runtime turns it
# off (tests/conftest.py).
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_TRAIN_ENABLE_PRINT_PATCH ?= 0
export RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S ?= 300

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes first and pinned: an unpinned torch (or one pulled in by another package) is a
# multi-GB CUDA build; torch==2.13.0 takes the CPU wheel where one is provided locally.
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[demo,test]"
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/python -m jobs.demo

lint: $(INSTALLED)
	$(BIN)/ruff check cvae_model pipeline jobs tests benchmarks

test: $(INSTALLED) lint
	$(BIN)/python -m pytest -q -rs --durations=15

clean:
	rm -rf $(VENV) demo_output cvae_runs mlflow.db mlruns .pytest_cache
