# Two commands a fresh machine needs: `make demo` (offline end-to-end run) and `make test`.
# Each creates .venv if missing and installs what it needs itself, at the versions in constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU torch first on machines without CUDA: a plain `torch` requirement would pull a multi-GB
# CUDA build. torch==2.13.0 is the CPU wheel on our machines' local disk. Machines with a GPU
# (nvidia-smi works) keep whatever torch pip resolves for them.
TORCH_CPU ?= torch==2.13.0
# The lock: every other dependency at the version CI tested. An unpinned resolve broke text-encoder
# training the day transformers 5.24 came out (it needs a peft that did not exist yet).
LOCK   := constraints.txt
STAMP  := $(VENV)/.installed
LATEST := .venv-latest

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast test-wheel test-latest lock lint format bench docs browser ui clean

$(PY):
	$(PYTHON) -m venv $(VENV)

define install_torch
	@if ! $(1) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    $(1) -m pip install -q torch; \
	  else \
	    $(1) -m pip install -q "$(TORCH_CPU)"; \
	  fi; \
	fi
endef

$(STAMP): $(PY) pyproject.toml $(LOCK)
	$(call install_torch,$(PY))
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dreambooth-kit demo

test: $(STAMP)
	$(PY) -m pytest -q

# The browser the web UI's test drives (tests/ui/test_browser.py): Debian's chromium and its driver,
# from apt (as root, or through sudo). Does nothing when both are there; CI runs it before the tests.
# Without them the test is skipped locally, and fails in CI. Elsewhere: any Chromium with the
# chromedriver of the same version on PATH.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  echo "browser: $$(chromium --version 2>/dev/null | head -1), $$(chromedriver --version | head -1)"; \
	else \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; \
	fi

# The web UI on http://127.0.0.1:7860 (dreambooth-kit ui), serving the current folder.
ui: $(STAMP)
	$(VENV)/bin/dreambooth-kit ui

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu and not network"

# What a wheel user gets: the wheel alone in a fresh venv, the newest releases pyproject allows (no
# lock), then a 1-step text-encoder LoRA training. CI runs it after `make test`.
test-wheel:
	PYTHON=$(PYTHON) .ci/wheel-alone

# Drift, seen instead of suffered: a fresh venv with the newest releases pyproject allows (no lock),
# the test suite on it, and the differences from the lock. If it passes, `make lock` adopts them.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(call install_torch,$(LATEST)/bin/python)
	$(LATEST)/bin/python -m pip install -q -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia|triton)' > $(LATEST)/freeze.txt
	@echo "== changes against $(LOCK) (< lock, > newest) =="
	@grep -v '^#' $(LOCK) | diff - $(LATEST)/freeze.txt || true
	$(LATEST)/bin/python -m pytest -q

lock: $(LATEST)/freeze.txt
	@{ grep '^#' $(LOCK); cat $(LATEST)/freeze.txt; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	@echo "$(LOCK) now holds the versions make test-latest tested"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/train_step.py

# The documentation site: the config reference regenerated from the schema's docstrings, then every
# page built with --strict (broken links or anchors, pages missing from nav fail). Output: build/site.
docs: $(STAMP)
	$(PY) docs/gen_config_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf runs .pytest_cache $(LATEST)
