# The two commands a newcomer needs: `make run` and `make test`. Both create
# the virtual environment on first use and install exactly requirements.lock.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PIP_VERSION := 24.3.1
# Extra arguments for `dqnfleet up` (make run) and pytest (make test).
ARGS ?=

.PHONY: install run test protos check-protos lock bench clean

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

test: install  ## The whole test suite (integration tests start real services).
	$(PY) -m pytest $(ARGS)

protos: install  ## Regenerate services/core/api from protos/.
	$(PY) -m dqnfleet.core.api.generate

check-protos: install
	$(PY) -m dqnfleet.core.api.generate --check

lock: install  ## Re-pin every dependency after changing pyproject.toml.
	$(PY) -m pip install --quiet -e '.[dev]'
	{ sed -n '1,2p' requirements.lock; $(PY) -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

bench: install  ## Benchmarks; each prints one JSON object (see docs/performance.md).
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(VENV) runs .pytest_cache
