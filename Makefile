# Two commands a fresh machine needs: `make demo` (offline end-to-end run) and `make test`.
# Each creates .venv if missing and installs what it needs itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU torch first on machines without CUDA: a plain `torch` requirement would pull a multi-GB
# CUDA build. torch==2.13.0 is the CPU wheel on our machines' local disk. Machines with a GPU
# (nvidia-smi works) keep whatever torch pip resolves for them.
TORCH_CPU ?= torch==2.13.0
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    $(PY) -m pip install -q torch; \
	  else \
	    $(PY) -m pip install -q "$(TORCH_CPU)"; \
	  fi; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dreambooth-kit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu and not network"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/train_step.py

clean:
	rm -rf runs .pytest_cache
