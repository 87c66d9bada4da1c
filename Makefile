# One runner for everything the README names. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help demo run test lint typecheck imports pytest faults fleet acceptance bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

var/config.toml: examples/local.toml
	mkdir -p var
	cp examples/local.toml $@

var/keys: | $(STAMP) var/config.toml
	$(BIN)/token-broker -c var/config.toml keys generate

demo: $(STAMP)  ## a local identity provider, the daemon, a headless login and a token, until Ctrl-C
	$(BIN)/python -m demo

run: $(STAMP) var/config.toml var/keys  ## run the daemon on the embedded defaults in ./var
	$(BIN)/token-broker -c var/config.toml serve

test: lint typecheck imports pytest  ## the whole suite: ruff, mypy --strict, import layers, pytest

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)  ## mypy --strict
	$(BIN)/mypy

imports: $(STAMP)  ## the layering contracts of pyproject.toml
	$(BIN)/lint-imports

pytest: $(STAMP)  ## the tests (starts its own PostgreSQL when the server binaries exist)
	$(BIN)/pytest

faults: $(STAMP)  ## the fault matrix (every fault x grace x store) and 2 x 30 kills mid-rotation (~12 min)
	$(BIN)/pytest -m faults tests/test_faults.py tests/test_rotation_crash.py

fleet: $(STAMP)  ## three brokers on one PostgreSQL at the real IdP, with kills and outages (~7 min)
	$(BIN)/pytest -m fleet tests/test_fleet_acceptance.py -s

acceptance: faults fleet  ## the long acceptance runs CI makes after `make test`

bench: $(STAMP)  ## every benchmark at full size (~10 min; results also in var/bench/*.json)
	$(BIN)/python -m bench --json-dir var/bench

clean:  ## remove the virtualenv and ./var
	rm -rf $(VENV) var
