# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml

.PHONY: run test lint clean bench

# The venv is rebuilt only when pyproject.toml changes (stamp files), so both targets are idempotent.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/vivoflow --config $(CONFIG) run

# Four test processes: most tests wait on servers and subprocesses, not on the CPU.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 4

# Under 4 minutes, loopback only: prints the table, writes bench/results/<stamp>.json and latest.json.
bench: $(VENV)/.installed
	@test -x $(BIN)/py-spy || $(BIN)/python -m pip install --quiet py-spy || echo "no py-spy: profiles skipped"
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data
