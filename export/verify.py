"""What every task's verification uses: onnxruntime sessions on CPU, the verification inputs, and
the error that stops an export. The checks themselves are the tasks' (`export.tasks`).

Verification runs at batch 1 and 3, never at the batch the graph was traced with, so a
batch size frozen into the graph cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.onnx_export import TRACE_BATCH

VERIFY_BATCHES = (1, 3)
assert TRACE_BATCH not in VERIFY_BATCHES
# ONNX (fp32) against PyTorch: max |diff| at most this fraction of the output's scale.
FP32_RELATIVE_TOLERANCE = 1e-4
# fp16 against fp32, both on onnxruntime: max |diff| at most this fraction of the output's scale.
# A Focal-T fp16 export measures ~6e-4 (random init); an overflow or a broken cast gives inf or O(1).
FP16_RELATIVE_TOLERANCE = 1e-2
# int8 (dynamic quantization) against fp32, both on onnxruntime: max |diff| at most this fraction of the
# logit scale, and top-1 kept for at least INT8_MIN_TOP1_AGREEMENT of all inputs, a near-tie counting as
# kept (see export.tasks.classify.compare_logits). A Focal-T measures ~2e-2 (random init).
INT8_RELATIVE_TOLERANCE = 0.1
INT8_MIN_TOP1_AGREEMENT = 0.9
INT8_VERIFY_BATCHES = (1, 3, 4, 5, 7, 12)  # 32 inputs, for an agreement rate; in batches that keep memory low


class VerificationError(Exception):
    """The exported graph does not compute what it should."""


def cpu_session(graph: Path | onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session over a file or an in-memory graph."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = str(graph) if isinstance(graph, Path) else graph.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_inputs(
    input_size: tuple[int, int], seed: int = 1234, batches: tuple[int, ...] = VERIFY_BATCHES
) -> dict[int, np.ndarray]:
    """Normalised-pixel-like inputs per verification batch size."""
    generator = torch.Generator().manual_seed(seed)
    return {b: torch.randn(b, 3, *input_size, generator=generator).numpy() for b in batches}


def run_onnx(graph: Path | onnx.ModelProto, inputs: dict[int, np.ndarray]) -> dict[int, list[np.ndarray]]:
    """Every output of the graph, per batch size."""
    session = cpu_session(graph)
    name = session.get_inputs()[0].name
    return {b: [np.asarray(o) for o in session.run(None, {name: x})] for b, x in inputs.items()}


def max_abs_diff_and_scale(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[float, float]:
    """max |reference - candidate| and max |reference| over pairs of arrays (NaN counts as infinite)."""
    diff = scale = 0.0
    for ref, got in zip(reference, candidate, strict=True):
        delta = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        diff = max(diff, float("inf") if np.isnan(delta).any() else float(delta.max()))
        scale = max(scale, float(np.abs(ref).max()))
    return diff, scale
