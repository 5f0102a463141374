# The two commands: `make demo` (the local demo) and `make test` (lint, types, tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test soak dashboard bench bench-quick bench-emulator bench-shutdown bench-artifacts bench-s3-client clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cpworker local

test: $(STAMP)
	bash tests/install-debian-tools.sh
	$(BIN)/ruff check cpworker tests benchmarks grafana
	$(BIN)/ruff format --check cpworker tests benchmarks grafana
	$(BIN)/mypy
	$(BIN)/python -m pytest

soak: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# The dashboard's panels drawn from a real Prometheus (grafana/dashboard.png).
dashboard: $(STAMP)
	bash tests/install-debian-tools.sh
	$(BIN)/python -m grafana.panels

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench.py --quick

bench-emulator: $(STAMP)
	$(BIN)/python benchmarks/emulator_load.py

bench-shutdown: $(STAMP)
	$(BIN)/python benchmarks/shutdown_drain.py
	$(BIN)/python benchmarks/shutdown_drain.py --sleep-s 3 --grace-s 30

bench-artifacts: $(STAMP)
	$(BIN)/python benchmarks/artifact_transfer.py

bench-s3-client: $(STAMP)
	$(BIN)/python benchmarks/s3_client_cost.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
