# The two commands: `make run` (the whole protocol on digits, SQLite, CPU) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow setup system lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, pinned to the builds this machine serves from local files.
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Debian packages and services the tests use: Chromium for the dashboard test,
# docker-compose to validate the compose file, a running PostgreSQL.
system:
	bash scripts/system-setup.sh

run: setup
	$(BIN)/babysit run

# `make test`: every test but the slow ones (whole runs in real processes, several
# workers, database faults, the browser), a few minutes on 2 cores. `make test-slow`: those,
# ~20 minutes. CI runs both.
test: setup system
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: setup system
	$(BIN)/python -m pytest -q -m slow tests

lint: setup
	$(BIN)/ruff format --check babysit tests benchmarks
	$(BIN)/ruff check babysit tests benchmarks
	$(BIN)/mypy babysit

bench: setup
	$(BIN)/python benchmarks/protocol_budget.py

clean:
	rm -rf $(VENV) babysit.db babysit.db.artifacts
