"""Numerical verification of an exported graph with onnxruntime, built into every export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.onnx_export import TRACE_BATCH

VERIFY_BATCHES = (1, 3)  # differ from the trace batch, so a frozen batch size cannot pass
FP32_RELATIVE_TOLERANCE = 1e-4
assert TRACE_BATCH not in VERIFY_BATCHES


class VerificationError(Exception):
    """The exported graph does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class Comparison:
    batches: tuple[int, ...]
    max_abs_diff: float
    logit_scale: float
    top1_agreement: float

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.logit_scale, 1e-12)

    def as_dict(self) -> dict[str, object]:
        return {
            "batches": list(self.batches),
            "max_abs_diff": self.max_abs_diff,
            "logit_scale": self.logit_scale,
            "relative_diff": self.relative,
            "top1_agreement": self.top1_agreement,
        }


def cpu_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def random_inputs(input_size: tuple[int, int], seed: int = 1234) -> dict[int, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    return {b: torch.randn(b, 3, *input_size, generator=generator).numpy() for b in VERIFY_BATCHES}


def compare(reference: dict[int, np.ndarray], candidate: dict[int, np.ndarray]) -> Comparison:
    diff = max(float(np.abs(reference[b] - candidate[b]).max()) for b in reference)
    scale = max(float(np.abs(reference[b]).max()) for b in reference)
    agree = np.concatenate([reference[b].argmax(-1) == candidate[b].argmax(-1) for b in reference])
    return Comparison(tuple(reference), diff, scale, float(agree.mean()))


def run_torch(model: nn.Module, inputs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    with torch.inference_mode():
        return {b: _first(model(torch.from_numpy(x))) for b, x in inputs.items()}


def run_onnx(path: Path, inputs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    session = cpu_session(path)
    name = session.get_inputs()[0].name
    return {b: np.asarray(session.run(None, {name: x})[0]) for b, x in inputs.items()}


def _first(output: object) -> np.ndarray:
    tensor = output[0] if isinstance(output, list | tuple) else output
    assert isinstance(tensor, torch.Tensor)
    return tensor.numpy()


def verify_fp32(model: nn.Module, onnx_path: Path, input_size: tuple[int, int]) -> Comparison:
    """ORT vs PyTorch at batch 1 and 3; raises when the difference exceeds 1e-4 of the logit scale."""
    inputs = random_inputs(input_size)
    result = compare(run_torch(model, inputs), run_onnx(onnx_path, inputs))
    if result.relative > FP32_RELATIVE_TOLERANCE:
        raise VerificationError(
            f"ONNX output differs from PyTorch: max |diff| {result.max_abs_diff:.3g} is "
            f"{result.relative:.3g} of the logit scale {result.logit_scale:.3g} (limit {FP32_RELATIVE_TOLERANCE})"
        )
    return result


def verify_fp16(fp32_path: Path, fp16_path: Path, input_size: tuple[int, int]) -> Comparison:
    """fp16 graph vs fp32 graph on onnxruntime (CPU runs fp16 graphs, slowly): deviation and top-1 agreement."""
    inputs = random_inputs(input_size)
    return compare(run_onnx(fp32_path, inputs), run_onnx(fp16_path, inputs))
