# The two commands of the README: `make run` and `make test`. Both set up everything they need
# on a fresh machine: the virtualenv and Python packages, PgBouncer (apt) and Azurite (npm).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test check lint typecheck doctor stack-up stack-down stack-status bench clean

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -m venv $(VENV) || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $(STAMP)

setup: $(STAMP)
	$(PY) -m recsys setup

run: setup
	$(PY) -m recsys run

test: setup check
	$(PY) -m pytest

check: lint typecheck doctor

lint: $(STAMP)
	$(PY) -m ruff check recsys tests function_app.py

typecheck: $(STAMP)
	$(PY) -m mypy

# azure-functions-doctor on the files a publish uploads (.funcignore applied to the tracked files).
doctor: $(STAMP)
	$(PY) -m recsys package --doctor

stack-up: setup
	$(PY) -m recsys stack up

stack-down: $(STAMP)
	$(PY) -m recsys stack down

stack-status: $(STAMP)
	$(PY) -m recsys stack status

# Benchmarks start their own stacks on free ports; BENCH="lookup recall" runs some of them.
bench: setup
	$(PY) -m recsys bench $(BENCH)

clean: stack-down
	rm -rf .stack .pytest_cache .mypy_cache .ruff_cache
