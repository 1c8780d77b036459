"""Classification's export hooks: a FocalTransformer with its head, one `logits` output.

Verification: onnxruntime against PyTorch within 1e-4 of the logit scale. fp16 against
fp32 (both onnxruntime): max deviation within 1e-2 of the logit scale, and the same top-1
class for every verification input, except where fp32's two best logits are closer than
that bound (a near-tie that any rounding may flip).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.int8 import QUANTIZATION_METHOD, cpu_description
from export.onnx_export import export_onnx
from export.options import ExportError, ExportOptions
from export.tasks.base import IMAGENET_MEAN, IMAGENET_STD, ExportTask, Graphs
from export.verify import (
    FP16_RELATIVE_TOLERANCE,
    FP32_RELATIVE_TOLERANCE,
    INT8_MIN_TOP1_AGREEMENT,
    INT8_RELATIVE_TOLERANCE,
    INT8_VERIFY_BATCHES,
    VerificationError,
    max_abs_diff_and_scale,
    random_inputs,
    run_onnx,
)
from focal import CheckpointAdaptationWarning, FocalConfig, FocalTransformer, imagenet1k_labels, load_checkpoint
from focal.checkpoint import CheckpointError
from focal.detection import is_detection_state_dict
from manifest import ClassifyManifest, CropPreprocess, TensorSpec

OUTPUT = "logits"
RESIZE_RATIO = 256 / 224  # the official evaluation transform: resize to 256/224 of the crop, centre crop


class ClassifyTask(ExportTask):
    name = "classify"
    default_size = (224, 224)
    default_batch = (8, 32)
    whole_model_role = "classifier"
    no_int8_reason = None

    def check(self, opts: ExportOptions) -> None:
        for flag, given in (("--canvases", opts.canvases), ("--canvas-set", opts.canvas_set),
                            ("--test-scale", opts.test_scale)):  # fmt: skip
            if given is not None:
                raise ExportError(f"{flag} is for --task detect; a classifier's input size is --image-size")
        if opts.backbone_weights is not None:
            raise ExportError("--backbone-weights is for --task detect; a classifier takes --weights")
        classes = opts.model_kwargs.get("num_classes", 1)
        if not isinstance(classes, int) or classes < 1:
            raise ExportError("--model-kwargs num_classes must be a positive integer (the export serves a classifier)")

    def weights_role(self, opts: ExportOptions) -> str:
        return "classifier"

    def num_classes(self, opts: ExportOptions, state: dict[str, Any] | None) -> int:
        classes = opts.model_kwargs.get("num_classes")
        if classes is None and state is not None and "head.weight" in state:
            classes = int(state["head.weight"].shape[0])
        return int(classes or 1000)

    def default_labels(self, num_classes: int) -> list[str] | None:
        return list(imagenet1k_labels()) if num_classes == 1000 else None

    def build(self, config: FocalConfig) -> nn.Module:
        return FocalTransformer(config).eval()

    def load_weights(self, model: nn.Module, state: dict[str, Any], role: str) -> list[str]:
        assert isinstance(model, FocalTransformer)
        if is_detection_state_dict(state):
            raise CheckpointError("this is a detection checkpoint (neck/bbox_head keys); export it with --task detect")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointAdaptationWarning)  # the adaptations are returned instead
            return load_checkpoint(model, state).adaptations

    def export(self, model: nn.Module, size: tuple[int, int], max_batch: int) -> Graphs:
        graph = export_onnx(model, size, [OUTPUT], max_batch=max_batch)
        return Graphs(served=graph, verified=graph)

    def verify_fp32(self, model: nn.Module, graph: onnx.ModelProto, size: tuple[int, int]) -> dict[str, Any]:
        inputs = random_inputs(size)
        expected = run_torch(model, inputs)
        got = {b: out[0] for b, out in run_onnx(graph, inputs).items()}
        report = compare_logits(expected, got)
        if report["relative_diff"] > FP32_RELATIVE_TOLERANCE:
            raise VerificationError(
                f"ONNX output differs from PyTorch: max |diff| {report['max_abs_diff']:.3g} is "
                f"{report['relative_diff']:.3g} of the logit scale {report['logit_scale']:.3g} "
                f"(limit {FP32_RELATIVE_TOLERANCE})"
            )
        return report

    def verify_fp16(
        self, model: nn.Module, fp32: onnx.ModelProto, fp16: onnx.ModelProto, size: tuple[int, int]
    ) -> dict[str, Any]:
        inputs = random_inputs(size)
        expected = {b: out[0] for b, out in run_onnx(fp32, inputs).items()}
        got = {b: out[0] for b, out in run_onnx(fp16, inputs).items()}
        report = compare_logits(expected, got, near_tie=FP16_RELATIVE_TOLERANCE)
        if report["relative_diff"] > FP16_RELATIVE_TOLERANCE or report["top1_flips"]:
            raise VerificationError(
                f"the fp16 graph disagrees with fp32: max |diff| {report['max_abs_diff']:.3g} is "
                f"{report['relative_diff']:.3g} of the logit scale {report['logit_scale']:.3g} "
                f"(limit {FP16_RELATIVE_TOLERANCE}), top-1 changed for {report['top1_flips']} of "
                f"{report['samples']} inputs; export without --fp16 (or keep more of the graph in fp32)"
            )
        return {**report, "checked_with": "onnxruntime CPU"}

    def verify_int8(self, fp32: Path, int8: Path, size: tuple[int, int]) -> dict[str, Any]:
        inputs = random_inputs(size, batches=INT8_VERIFY_BATCHES)
        expected = {b: out[0] for b, out in run_onnx(fp32, inputs).items()}
        got = {b: out[0] for b, out in run_onnx(int8, inputs).items()}
        report = compare_logits(expected, got, near_tie=FP16_RELATIVE_TOLERANCE)
        # What is gated: the top-1 class kept, a near-tie (within near_tie of the scale in fp32) counting as kept.
        report["top1_kept"] = 1 - report["top1_flips"] / report["samples"]
        report["limits"] = {
            "relative_diff": INT8_RELATIVE_TOLERANCE,
            "top1_kept": INT8_MIN_TOP1_AGREEMENT,
            "near_tie": FP16_RELATIVE_TOLERANCE,
        }
        if report["relative_diff"] > INT8_RELATIVE_TOLERANCE or report["top1_kept"] < INT8_MIN_TOP1_AGREEMENT:
            raise VerificationError(
                f"the int8 graph disagrees with fp32: max |diff| {report['max_abs_diff']:.3g} is "
                f"{report['relative_diff']:.3g} of the logit scale {report['logit_scale']:.3g} (limit "
                f"{INT8_RELATIVE_TOLERANCE}), top-1 changed for {report['top1_flips']} of {report['samples']} inputs "
                f"(at most {1 - INT8_MIN_TOP1_AGREEMENT:.0%} allowed); export without --int8"
            )
        return {**report, "method": QUANTIZATION_METHOD, "checked_with": f"onnxruntime CPU: {cpu_description()}"}

    def summary(self, report: dict[str, Any]) -> str:
        kept = f", top-1 kept {report['top1_kept']:.0%} (near-ties count as kept)" if "top1_kept" in report else ""
        return (
            f"max |diff| {report['max_abs_diff']:.2e} ({report['relative_diff']:.1e} of scale), "
            f"top-1 agreement {report['top1_agreement']:.0%}{kept}"
        )

    def manifest(
        self, model: nn.Module, size: tuple[int, int], fields: dict[str, Any], opts: ExportOptions
    ) -> ClassifyManifest:
        h, w = size
        return ClassifyManifest(
            **fields,
            outputs=[TensorSpec(name=OUTPUT, dtype="float32", shape=["batch", int(fields["num_classes"])])],
            preprocess=CropPreprocess(
                # The image is scaled, keeping its aspect ratio, to the smallest size covering this; for a
                # square crop its short side becomes 256/224 of the crop: the official Resize(256) for 224.
                resize_to_cover=(int(RESIZE_RATIO * h), int(RESIZE_RATIO * w)),
                crop=(h, w),
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                normalise="graph" if fields["input"].dtype == "uint8" else "host",
            ),
        )


def run_torch(model: nn.Module, inputs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    with torch.inference_mode():
        return {b: model(torch.from_numpy(x)).numpy() for b, x in inputs.items()}


def compare_logits(
    reference: dict[int, np.ndarray], candidate: dict[int, np.ndarray], near_tie: float = 0.0
) -> dict[str, Any]:
    """Max deviation, its fraction of the logit scale, and top-1 agreement. A disagreement counts as a
    flip unless the class the candidate chose is, in the reference, within `near_tie` of the scale of
    the best logit (a near-tie, which any rounding may break either way)."""
    diff, scale = max_abs_diff_and_scale(list(reference.values()), list(candidate.values()))
    ref = np.concatenate(list(reference.values()))
    got = np.concatenate(list(candidate.values()))
    chosen = got.argmax(-1)
    agree = ref.argmax(-1) == chosen
    chosen_ref = np.take_along_axis(ref, chosen[:, None], axis=-1)[:, 0]
    clear = ref.max(axis=-1) - chosen_ref > near_tie * scale
    return {
        "batches": list(reference),
        "samples": len(ref),
        "max_abs_diff": diff,
        "logit_scale": scale,
        "relative_diff": diff / max(scale, 1e-12),
        "top1_agreement": float(agree.mean()),
        "top1_flips": int((~agree & clear).sum()),
    }
