# focal-serve images. Targets:
#   cpu     slim Python + onnxruntime: the service on CPUs
#   gpu     CUDA runtime + TensorRT + onnxruntime-gpu: the service on NVIDIA GPUs, and
#           `python -m export.engine`, which builds the TensorRT engine on the node that serves
#   export  torch (CPU build) + ONNX tools: `python -m export`, one-shot
# No engine is baked into any image: an engine only runs on the GPU type and TensorRT
# version it was built with, so it is built at deploy time (see README, Deployment).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# --- the project as a wheel (pure Python) ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY focal/ focal/
COPY export/ export/
COPY manifest/ manifest/
COPY service/ service/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- what the CPU serving and export images share ---------------------------------------------
FROM ${PYTHON_IMAGE} AS python-runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin focal \
    && mkdir -p /models /cache /home/focal \
    && chown 10001:10001 /models /cache /home/focal

# --- CPU serving ---------------------------------------------------------------------------
FROM python-runtime AS cpu
ENV FOCAL_HOST=0.0.0.0 FOCAL_PORT=8000 FOCAL_MODELS=/models/model
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(find /wheels -name 'focal_serve-*.whl')[cpu]" \
    && rm -rf /wheels
USER 10001
WORKDIR /home/focal
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "service"]

# --- export (one-shot) ---------------------------------------------------------------------
FROM python-runtime AS export
ENV FOCAL_CACHE_DIR=/cache/checkpoints
COPY --from=wheel /wheels /wheels
# torch from PyTorch's CPU index: PyPI's default Linux build is the multi-GB CUDA one.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        "$(find /wheels -name 'focal_serve-*.whl')[export,cpu]" \
    && rm -rf /wheels
USER 10001
WORKDIR /home/focal
ENTRYPOINT ["python", "-m", "export"]

# --- GPU serving ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    FOCAL_HOST=0.0.0.0 \
    FOCAL_PORT=8000 \
    FOCAL_MODELS=/cache/model
# Ubuntu's python3 is whatever the pinned CUDA image's release ships (24.04: 3.12); pinning
# apt package versions would break the build on every Ubuntu security update, hence DL3008.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin focal \
    && mkdir -p /models /cache /home/focal \
    && chown 10001:10001 /models /cache /home/focal
# TensorRT 10.x (10.4+: strongly typed networks) on the CUDA 12.6 base. TensorRT 11's CUDA 12 builds
# are CUDA 12.9 (driver R575+): for it, build with
# --build-arg CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04 and "tensorrt-cu12>=11,<12" below.
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(find /wheels -name 'focal_serve-*.whl')[gpu]" "tensorrt-cu12>=10.4,<11" \
    && rm -rf /wheels
USER 10001
WORKDIR /cache
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "service"]
