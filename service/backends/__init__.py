"""Backends run one batch of preprocessed images: `infer(pixels [N, 3, H, W]) -> float32 [N, ...]`, the
pixels in the manifest's input type (float32 normalised, or uint8 for a graph that normalises).

The output is the export's one output: logits [N, classes] for a classifier,
candidate rows [N, K, 6] for a detector (see `service.tasks`). `close()` frees
what the backend holds (sessions, device and pinned buffers); after it, `infer`
must not be called.

`load_backend` picks one from the manifest and the machine (or the `backend`
setting): the TensorRT engine when it exists and matches this GPU and TensorRT
version, else onnxruntime (CUDA provider when it really is active, else CPU).
PyTorch is a reference backend that rebuilds the model from the manifest with the
export's own task hooks (it needs the `export` extra; the other two never import
torch, `focal` or `export`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from manifest import Manifest

log = logging.getLogger("focal.service")


class BackendUnavailable(Exception):
    """This backend cannot run this export here (the message says why)."""


class Backend(Protocol):
    name: str  # "tensorrt", "onnxruntime" or "torch"
    device: str  # where it runs, in words
    precision: str  # "fp32", "fp16" or "int8": what actually runs
    max_batch_size: int

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def load_backend(
    folder: Path, manifest: Manifest, choice: str, intra_op_threads: int = 0, intra_op_spinning: bool = True
) -> Backend:
    if choice in ("auto", "tensorrt") and manifest.engine is not None:
        try:
            from service.backends.tensorrt_backend import TensorRTBackend

            return TensorRTBackend(folder, manifest)
        except BackendUnavailable as exc:
            if choice == "tensorrt":
                raise
            log.warning("TensorRT engine not used, falling back to onnxruntime: %s", exc)
    elif choice == "tensorrt":
        raise BackendUnavailable(f"{folder}: the export has no TensorRT engine ({manifest.engine_skipped_reason})")
    if choice == "torch":
        from service.backends.torch_backend import TorchBackend

        return TorchBackend(manifest)
    from service.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(folder, manifest, intra_op_threads=intra_op_threads, spinning=intra_op_spinning)
