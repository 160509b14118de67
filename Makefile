# Two commands for a newcomer: `make demo` and `make test`. Everything else (venv, packages,
# servers) is installed or started by the project itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv demo test lint typecheck unit integration bench bench-fleet soak clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/pipeline demo $(DEMO_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# The end-to-end modules and the hostile corpus run a second time with nats-server's MQTT
# listener as the broker (what `make demo` uses), so that path is tested on machines that have
# mosquitto too. The fault suite runs with mosquitto only: see "Brokers" in the README.
test: venv lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)
	MESSWERTE_TEST_BROKER=nats $(BIN)/pytest tests/integration/test_pipeline.py tests/integration/test_bess_pipeline.py tests/integration/test_mixed_load.py tests/integration/test_hostile_input.py $(PYTEST_ARGS)

# Throughput and latency of raw ceiling, naive baseline, fused and split on the same load
# (bench/README in the main README); BENCH_ARGS="--messages 20000" for a quicker run.
BENCH_ARGS ?=
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(BIN)/.bench-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench $(BENCH_ARGS)

# The fleet bench (issue "fleet scale"): 1,000 to 100,000 units, the quarter-hour burst, a
# sustained run at the fleet's rate; table, JSON and chart in bench/results/.
FLEET_ARGS ?= --fleet 1000,10000,100000
bench-fleet: $(BIN)/.bench-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench $(FLEET_ARGS)

soak: $(BIN)/.bench-installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench --soak $(BENCH_ARGS)

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: venv
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
