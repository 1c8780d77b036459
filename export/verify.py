"""Numerical verification of an exported graph with onnxruntime, built into every export."""

from __future__ import annotations

import itertools
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


# Detection: the raw head outputs must match as tightly as classification logits. The selected
# candidates are compared as sets per level: near-tied logits (common at random init, where the
# 4.6 M class logits of a 640x640 canvas sit close to the prior) may swap places or cross the
# top-k boundary between runtimes, so agreement is a fraction, required to stay high.
MIN_SELECTION_AGREEMENT = 0.99


@dataclass(frozen=True)
class DetectionComparison:
    batches: tuple[int, ...]
    raw_max_abs_diff: float | None  # head logits and deltas (fp32 check only)
    raw_scale: float | None
    score_max_abs_diff: float  # the per-level sorted candidate scores
    selection_agreement: float  # rows with the same class and (within box_tolerance) the same box
    box_tolerance: float

    def as_dict(self) -> dict[str, object]:
        return {
            "batches": list(self.batches),
            "raw_max_abs_diff": self.raw_max_abs_diff,
            "raw_scale": self.raw_scale,
            "score_max_abs_diff": self.score_max_abs_diff,
            "selection_agreement": self.selection_agreement,
            "box_tolerance_px": self.box_tolerance,
        }


def compare_selections(
    reference: dict[int, np.ndarray], candidate: dict[int, np.ndarray], level_rows: list[int], box_tolerance: float
) -> tuple[float, float]:
    """(max score difference, fraction of candidates also selected by the reference) of two [B, K, 6] tensors.

    A candidate counts as also selected when the reference's same level holds a row of the same class
    and (within `box_tolerance`) the same box, at any position: near-tied scores may swap places."""
    score_diff = max(float(np.abs(reference[b][..., 4] - candidate[b][..., 4]).max()) for b in reference)
    found = total = 0
    bounds = np.cumsum([0, *level_rows])
    for b in reference:
        for ref, got in zip(reference[b], candidate[b], strict=True):
            for start, stop in itertools.pairwise(bounds):
                r, g = ref[start:stop], got[start:stop]
                same_class = g[:, None, 5] == r[None, :, 5]
                close = np.abs(g[:, None, :4] - r[None, :, :4]).max(axis=-1) <= box_tolerance
                found += int((same_class & close).any(axis=1).sum())
                total += len(g)
    return score_diff, found / max(total, 1)


def verify_detection_fp32(model: nn.Module, onnx_path: Path, input_size: tuple[int, int]) -> DetectionComparison:
    """ORT vs PyTorch at batch 1 and 3 on a graph that also outputs the raw per-level head tensors."""
    inputs = random_inputs(input_size)
    session = cpu_session(onnx_path)
    name = session.get_inputs()[0].name
    raw_diff = raw_scale = 0.0
    ours: dict[int, np.ndarray] = {}
    theirs: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for b, x in inputs.items():
            raw = model.forward_raw(torch.from_numpy(x))  # type: ignore[operator]
            ours[b] = model.select_and_decode(raw).numpy()  # type: ignore[operator]
            outputs = session.run(None, {name: x})
            theirs[b] = np.asarray(outputs[0])
            flat = [t.numpy() for level in raw for t in level]
            for ref, got in zip(flat, outputs[1:], strict=True):
                raw_diff = max(raw_diff, float(np.abs(ref - np.asarray(got)).max()))
                raw_scale = max(raw_scale, float(np.abs(ref).max()))
    tolerance = 1e-3 * max(input_size)
    score_diff, agreement = compare_selections(ours, theirs, model.level_candidates, tolerance)  # type: ignore[arg-type]
    result = DetectionComparison(tuple(inputs), raw_diff, raw_scale, score_diff, agreement, tolerance)
    if raw_diff > FP32_RELATIVE_TOLERANCE * max(raw_scale, 1e-12) or score_diff > FP32_RELATIVE_TOLERANCE:
        raise VerificationError(
            f"ONNX detection outputs differ from PyTorch: head outputs max |diff| {raw_diff:.3g} "
            f"(scale {raw_scale:.3g}), candidate scores max |diff| {score_diff:.3g} (limit {FP32_RELATIVE_TOLERANCE})"
        )
    if agreement < MIN_SELECTION_AGREEMENT:
        raise VerificationError(
            f"ONNX selects other candidates than PyTorch: {agreement:.1%} of rows agree "
            f"(at least {MIN_SELECTION_AGREEMENT:.0%} expected)"
        )
    return result


def verify_detection_fp16(
    fp32_path: Path, fp16_path: Path, input_size: tuple[int, int], level_rows: list[int]
) -> DetectionComparison:
    """fp16 graph vs fp32 graph on onnxruntime: score deviation and candidate agreement (reported, not gated)."""
    inputs = random_inputs(input_size)
    tolerance = 1e-2 * max(input_size)
    fp32, fp16 = run_onnx(fp32_path, inputs), run_onnx(fp16_path, inputs)
    score_diff, agreement = compare_selections(fp32, fp16, level_rows, tolerance)
    return DetectionComparison(tuple(inputs), None, None, score_diff, agreement, tolerance)
