# Two entry points (see README): `make run` (the main job) and `make test`.
# Each creates its own virtual environment (.venv) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: export the default model and serve it on port 8000. Offline, so the weights
# are random-init (labelled as such in the logs, /v1/models and every response); the README
# shows how to serve the official weights. Re-running reuses the export (sha256-checked).
MODEL_DIR ?= artifacts/focal_tiny-classify-224x224-fp32-random-init
run: $(VENV)/.installed
	$(PY) -m export --variant focal_tiny --random-init --out $(MODEL_DIR)
	$(PY) -m service --model $(MODEL_DIR)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m bench.cpu_throughput

# On a machine with an NVIDIA GPU: build the TensorRT engines, run the TensorRT tests, parity and load;
# one report in bench/results/gpu_check.md. Its own environment (.venv-gpu); stops at once without a GPU.
gpu-check:
	bench/gpu_check.sh

clean:
	rm -rf $(VENV) .venv-gpu artifacts .pytest_cache .mypy_cache .ruff_cache
