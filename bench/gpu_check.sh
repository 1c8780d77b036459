#!/usr/bin/env bash
# make gpu-check: the TensorRT path on this machine's GPU, in one command (bench/gpu_check.py says what
# it does). Its own environment (.venv-gpu: the `gpu` extra's TensorRT, cuda-python and onnxruntime-gpu,
# which must never share an environment with the CPU onnxruntime of .venv).
# Stops at once, with one line and a non-zero status, where there is no NVIDIA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: cannot run here: no NVIDIA GPU (nvidia-smi is missing or sees no GPU)" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-.venv-gpu}
# The TensorRT the gpu image ships (10.x on CUDA 12.6). TensorRT 11's CUDA 12 builds need driver R575+:
# TENSORRT="tensorrt-cu12>=11,<12" make gpu-check. torch is the CPU build (the export needs no GPU).
TENSORRT=${TENSORRT:-"tensorrt-cu12>=10.4,<11"}
if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    echo "[setup] $VENV with .[export,gpu,bench,test] and $TENSORRT (a few minutes, once)"
    "$PYTHON" -m venv "$VENV"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip \
           && "$VENV/bin/python" -m pip install -e '.[export,gpu,bench,test]' "$TENSORRT" \
                  --extra-index-url https://download.pytorch.org/whl/cpu; } >"$VENV/install.log" 2>&1; then
        echo "gpu-check: cannot run here: installing .[gpu] (TensorRT, cuda-python, onnxruntime-gpu) failed;" \
             "see $VENV/install.log" >&2
        exit 2
    fi
    touch "$VENV/.installed"
fi
exec "$VENV/bin/python" -m bench.gpu_check "$@"
