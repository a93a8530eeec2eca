# The two commands of the README. Both run the idempotent set-up first (seconds when done).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/supmae demo --output-dir $(DEMO_DIR)

test: setup
	@$(PY) -m pytest -q tests

lint: setup
	@$(VENV)/bin/ruff check .
