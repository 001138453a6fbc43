# The two commands a newcomer needs: `make run` and `make test`. Both create
# the virtual environment on first use and install exactly requirements.lock.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PIP_VERSION := 24.3.1
# Extra arguments for `dqnfleet up` (make run) and pytest (make test, make test-fast).
ARGS ?=

.PHONY: install run test test-fast lint format protos check-protos lock bench clean

install: $(INSTALLED)

$(INSTALLED): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@touch $@

run: install  ## Train DQN on Breakout: replay, trainer and 2 collectors on this machine.
	$(VENV)/bin/dqnfleet up $(ARGS)

test: install lint  ## Lint, then the whole test suite (integration tests start real services).
	$(PY) -m pytest $(ARGS)

test-fast: install  ## All but the slow tests (marker `slow`: fleets of processes, compose, `up`).
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: install  ## Style cannot drift: ruff's lint rules and formatter (pyproject.toml).
	$(VENV)/bin/ruff check services bench tests
	$(VENV)/bin/ruff format --check services bench tests

format: install  ## Rewrite the code in the project's style (what `make lint` checks).
	$(VENV)/bin/ruff check --fix services bench tests
	$(VENV)/bin/ruff format services bench tests

protos: install  ## Regenerate services/core/api from protos/.
	$(PY) -m dqnfleet.core.api.generate

check-protos: install
	$(PY) -m dqnfleet.core.api.generate --check

lock: install  ## Re-pin every dependency after changing pyproject.toml.
	$(PY) -m pip install --quiet -e '.[dev]'
	{ sed -n '1,2p' requirements.lock; $(PY) -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# Benchmarks that take no arguments; bench/evaluator_cost.py (a run directory)
# and bench/plot_learning_curve.py (history files) measure a finished run.
BENCHES := collector_throughput trainer_throughput replay_memory replay_scale replay_checkpoint \
           policy_fanout

bench: install  ## Benchmarks; each prints JSON (see docs/performance.md). Stops at the first failure.
	@set -e; for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py; done
	@echo "== bench/evaluator_cost.py and bench/plot_learning_curve.py need a finished run: see docs/"

clean:
	rm -rf $(VENV) runs .pytest_cache
