# The two commands: `make demo` and `make test`. Both create .venv and install on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Quiet, offline-friendly defaults for Ray and MLflow (no usage stats, no telemetry).
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_TRAIN_ENABLE_PRINT_PATCH ?= 0
export RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S ?= 300

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes first and pinned: an unpinned torch (or one pulled in by another package) is a
# multi-GB CUDA build; torch==2.13.0 takes the CPU wheel where one is provided locally.
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/python -m jobs.demo

test: $(INSTALLED)
	$(BIN)/python -m pytest -q -rs --durations=15

clean:
	rm -rf $(VENV) demo_output cvae_runs mlflow.db mlruns .pytest_cache
