# The two quick-start commands (README): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint generate

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 "numpy<2.4"   # the CPU wheel; a bare `torch` pulls a CUDA build
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/tandem demo

generate: setup
	$(BIN)/tandem generate --model tiny --prompt "Hello, Tandem" --max-tokens 16

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check orchestrator workers tests scripts
	$(BIN)/mypy
