# Two commands set up everything on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# pytest-xdist workers for make test: the fast tests are independent (own tmp dirs; no process groups), and two workers take
# the suite from ~460 s to ~285 s on a 2-core machine. The slow tests (DDP, submitit) run one at a time.
TEST_WORKERS ?= 2

.PHONY: run test test-slow lint smoke bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when the project's own install files change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(DEV_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

run: $(STAMP)
	$(BIN)/cvlab train

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)
	$(BIN)/cvlab smoke

lint: $(DEV_STAMP)
	$(BIN)/ruff check cvlab tests scripts

test-slow: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
