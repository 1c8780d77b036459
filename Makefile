# Two entry points (see README): `make run` (the main job) and `make test`.
# Each creates its own virtual environment (.venv) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Until the service exists, the main job is the export of the default model. Offline, so
# random-init (labelled as such in the log and the manifest); see README for official weights.
run: $(VENV)/.installed
	$(PY) -m export --variant focal_tiny --random-init

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m bench.cpu_throughput

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
