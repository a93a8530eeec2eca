# The two commands of the README. Both run the idempotent set-up first (seconds when done).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# Test processes (pytest-xdist): most tests keep one core busy (a subprocess with one thread, numba or torch
# start-up), so two keep a 2-core machine full; the kill -9 matrix spreads over them case by case.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/supmae demo --output-dir $(DEMO_DIR)

test: setup
	@$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# The inner loop of a change (a few minutes): every test not marked slow, and the slow ones marked core,
# so that each job trains on each pipeline, under torchrun too, and each input layout converts.
test-fast: setup
	@$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow or core" tests

lint: setup
	@$(VENV)/bin/ruff check .
