"""Detection's export hooks: Focal-RetinaNet on a static canvas, one `detections` output.

The served graph ends with each level's top candidates, decoded: [batch, K, 6] rows of
(x1, y1, x2, y2, score, class_id) in canvas pixels. Verification reads a second graph,
the same one with the raw per-level head outputs (class logits and box deltas) as extra
outputs, kept in memory only:

- fp32: the head outputs against PyTorch within 1e-4 of their scale, the candidate
  scores within 1e-4, and at least 99% of the selected candidates the same (compared
  as sets per level: near-tied logits may swap places or cross the top-k boundary
  between runtimes).
- fp16: the head outputs against fp32 within 1e-2 of their scale (the gate); the
  candidate agreement is reported, not gated (at random init the 4.6 M class logits of a
  640x640 canvas crowd around the prior, and fp16 reorders near-ties).

The fp16 served graph is the fp16 verification graph with the extra outputs removed, so
the graph that is gated is the graph that is served.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export import canvases
from export.onnx_export import export_onnx, keep_outputs
from export.options import ExportError, ExportOptions, read_label_file
from export.tasks.base import IMAGENET_MEAN, IMAGENET_STD, ExportTask, Graphs
from export.verify import (
    FP16_RELATIVE_TOLERANCE,
    FP32_RELATIVE_TOLERANCE,
    VerificationError,
    max_abs_diff_and_scale,
    random_inputs,
    run_onnx,
)
from focal import CheckpointAdaptationWarning, FocalConfig
from focal.checkpoint import CheckpointError
from focal.detection import (
    FocalRetinaNet,
    RetinaNetConfig,
    is_detection_state_dict,
    load_backbone_weights,
    load_detection_checkpoint,
)
from focal.labels import coco_labels
from manifest import CanvasGraphs, Detection, DetectManifest, LetterboxPreprocess, Manifest, TensorSpec

OUTPUT = "detections"
MIN_SELECTION_AGREEMENT = 0.99


class DetectTask(ExportTask):
    name = "detect"
    default_size = (640, 640)
    default_batch = (2, 8)  # a 640x640 detector costs ~16x a 224 classifier per image
    whole_model_role = "detector"
    no_int8_reason = "a detector's quantized outputs have no verification bound yet (classifiers have one)"
    no_uint8_reason = (
        "the letterbox pads with the colour that normalises to zero (ImageNet mean x 255 = 123.675, 116.28, "
        "103.53), which no uint8 value is, so uint8 input would change what the model sees near the padding"
    )

    def input_sizes(self, opts: ExportOptions) -> list[tuple[int, int]]:
        if opts.canvases:
            return canvases.order(opts.canvases)
        return canvases.canvas_set(self._set_scale(opts))

    def test_scale(self, opts: ExportOptions) -> tuple[int, int] | None:
        """The keep-ratio resize's (long, short) the manifest records (None: derived from the canvases)."""
        return opts.test_scale if opts.canvases else self._set_scale(opts)

    @staticmethod
    def _set_scale(opts: ExportOptions) -> tuple[int, int]:
        return canvases.CANVAS_SETS[opts.canvas_set or canvases.DEFAULT_CANVAS_SET]

    def check(self, opts: ExportOptions) -> None:
        if opts.image_size is not None:
            raise ExportError(
                "--image-size is a classifier's input; a detector's input sizes are its canvases: "
                "--canvases HxW[,HxW...] or --canvas-set " + "|".join(canvases.CANVAS_SETS)
            )
        if opts.canvases is not None and opts.canvas_set is not None:
            raise ExportError("give --canvases or --canvas-set, not both")
        if opts.canvas_set is not None and opts.canvas_set not in canvases.CANVAS_SETS:
            raise ExportError(f"--canvas-set {opts.canvas_set!r}: one of {', '.join(canvases.CANVAS_SETS)}")
        if opts.test_scale is not None and not opts.canvases:
            raise ExportError("--test-scale goes with --canvases (a --canvas-set has its own scale)")
        if opts.canvases is not None and not opts.canvases:
            raise ExportError("--canvases: give at least one HxW")
        if not any(opts.weights_given):
            raise ExportError(
                "--task detect needs weights: --weights (an mmdetection RetinaNet checkpoint), "
                "--backbone-weights or --pretrained (an ImageNet backbone; FPN and head untrained), "
                "or --random-init (no official detection checkpoints exist)"
            )
        for h, w in opts.sizes:
            if h % canvases.STRIDE or w % canvases.STRIDE or min(h, w) < 64:
                raise ExportError(f"canvas {h}x{w}: a detection canvas needs sides that are multiples of 32, >= 64")
        if "num_classes" in opts.model_kwargs:
            raise ExportError(
                "--model-kwargs num_classes: a detector takes its classes from its checkpoint or --labels"
            )

    def weights_role(self, opts: ExportOptions) -> str:
        return "backbone" if opts.backbone_weights is not None or opts.pretrained else "detector"

    def num_classes(self, opts: ExportOptions, state: dict[str, Any] | None) -> int:
        if self.weights_role(opts) == "detector" and state is not None and "bbox_head.retina_cls.bias" in state:
            return int(state["bbox_head.retina_cls.bias"].shape[0]) // RetinaNetConfig().anchors.per_location
        if opts.labels is not None:
            return len(read_label_file(opts.labels))
        return len(coco_labels())

    def default_labels(self, num_classes: int) -> list[str] | None:
        return list(coco_labels()) if num_classes == len(coco_labels()) else None

    def build(self, config: FocalConfig) -> nn.Module:
        return FocalRetinaNet(config, RetinaNetConfig(num_classes=config.num_classes)).eval()

    def load_weights(self, model: nn.Module, state: dict[str, Any], role: str) -> list[str]:
        assert isinstance(model, FocalRetinaNet)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointAdaptationWarning)  # the adaptations are returned instead
            if role == "backbone":
                if is_detection_state_dict(state):
                    raise CheckpointError("--backbone-weights got a detection checkpoint; give it as --weights instead")
                return load_backbone_weights(model, state).adaptations
            if not is_detection_state_dict(state):
                raise CheckpointError(
                    "--weights for --task detect must be an mmdetection RetinaNet checkpoint (backbone./neck./"
                    "bbox_head. keys); this one has none of the neck or head: for an ImageNet checkpoint use "
                    "--backbone-weights"
                )
            return load_detection_checkpoint(model, state).adaptations

    def export(self, model: nn.Module, size: tuple[int, int], max_batch: int) -> Graphs:
        assert isinstance(model, FocalRetinaNet)
        names = [OUTPUT, *raw_output_names(model)]
        verified = export_onnx(_WithRaw(model), size, names, max_batch=max_batch)
        return Graphs(served=keep_outputs(verified, [OUTPUT]), verified=verified)

    def verify_fp32(self, model: nn.Module, graph: onnx.ModelProto, size: tuple[int, int]) -> dict[str, Any]:
        assert isinstance(model, FocalRetinaNet)
        inputs = random_inputs(size)
        expected: dict[int, list[np.ndarray]] = {}
        with torch.inference_mode():
            for b, x in inputs.items():
                raw = model.forward_raw(torch.from_numpy(x))
                expected[b] = [model.select_and_decode(raw).numpy(), *(t.numpy() for level in raw for t in level)]
        report = compare_detections(expected, run_onnx(graph, inputs), model.level_candidates, 1e-3 * max(size))
        if (
            report["raw_max_abs_diff"] > FP32_RELATIVE_TOLERANCE * max(report["raw_scale"], 1e-12)
            or report["score_max_abs_diff"] > FP32_RELATIVE_TOLERANCE
        ):
            raise VerificationError(
                f"ONNX detection outputs differ from PyTorch: head outputs max |diff| {report['raw_max_abs_diff']:.3g} "
                f"(scale {report['raw_scale']:.3g}), candidate scores max |diff| {report['score_max_abs_diff']:.3g} "
                f"(limit {FP32_RELATIVE_TOLERANCE})"
            )
        if report["selection_agreement"] < MIN_SELECTION_AGREEMENT:
            raise VerificationError(
                f"ONNX selects other candidates than PyTorch: {report['selection_agreement']:.1%} of rows agree "
                f"(at least {MIN_SELECTION_AGREEMENT:.0%} expected)"
            )
        return report

    def verify_fp16(
        self, model: nn.Module, fp32: onnx.ModelProto, fp16: onnx.ModelProto, size: tuple[int, int]
    ) -> dict[str, Any]:
        assert isinstance(model, FocalRetinaNet)
        inputs = random_inputs(size)
        levels = model.level_candidates
        got = run_onnx(fp16, inputs)
        report = compare_detections(run_onnx(fp32, inputs), got, levels, 1e-2 * max(size))
        if report["raw_max_abs_diff"] > FP16_RELATIVE_TOLERANCE * max(report["raw_scale"], 1e-12):
            raise VerificationError(
                f"the fp16 graph disagrees with fp32: head outputs max |diff| {report['raw_max_abs_diff']:.3g} is "
                f"{report['raw_max_abs_diff'] / max(report['raw_scale'], 1e-12):.3g} of their scale "
                f"{report['raw_scale']:.3g} (limit {FP16_RELATIVE_TOLERANCE}); export without --fp16"
            )
        # The served rows (selection and the fp32 decoding tail): finite, and each level's sorted scores
        # where fp32 has them (near-ties may swap candidates, not move the sorted scores).
        if not all(np.isfinite(out[0]).all() for out in got.values()) or (
            report["score_max_abs_diff"] > FP16_RELATIVE_TOLERANCE
        ):
            raise VerificationError(
                f"the fp16 graph's detections disagree with fp32: candidate scores max |diff| "
                f"{report['score_max_abs_diff']:.3g} (limit {FP16_RELATIVE_TOLERANCE}), or rows that are not finite"
            )
        return {**report, "checked_with": "onnxruntime CPU"}

    def summary(self, report: dict[str, Any]) -> str:
        return (
            f"head outputs max |diff| {report['raw_max_abs_diff']:.2e} (scale {report['raw_scale']:.2f}), "
            f"candidate scores {report['score_max_abs_diff']:.2e}, same candidates {report['selection_agreement']:.1%}"
        )

    def manifest(
        self, model: nn.Module, size: tuple[int, int], fields: dict[str, Any], opts: ExportOptions
    ) -> DetectManifest:
        assert isinstance(model, FocalRetinaNet)
        return DetectManifest(
            **fields,
            outputs=[TensorSpec(name=OUTPUT, dtype="float32", shape=["batch", model.num_candidates, 6])],
            preprocess=LetterboxPreprocess(
                canvas=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, test_scale=self.test_scale(opts)
            ),
            detection=Detection.model_validate(model.describe()),
        )

    def add_canvas(self, first: Manifest, other: Manifest) -> None:
        assert isinstance(first, DetectManifest)
        assert isinstance(other, DetectManifest)
        if other.onnx_int8 is not None:  # a canvas's entry has no int8 graph (--int8 is refused for detectors)
            raise ExportError("an int8 graph per canvas is not recorded in the manifest")
        first.canvases.append(
            CanvasGraphs(
                canvas=other.input_size,
                levels=other.detection.levels,
                **{name: getattr(other, name) for name in ("onnx", "onnx_fp32", "input", "outputs", "graph")},
                verification=other.verification,
            )
        )


def raw_output_names(model: FocalRetinaNet) -> list[str]:
    return [f"{kind}_p{3 + i}" for i in range(len(model.level_sizes)) for kind in ("logits", "deltas")]


class _WithRaw(nn.Module):
    """The detector with its per-level head outputs as extra graph outputs (for verification only)."""

    def __init__(self, model: FocalRetinaNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.model.forward_raw(x)
        return (self.model.select_and_decode(raw), *(t for level in raw for t in level))


def compare_detections(
    reference: dict[int, list[np.ndarray]], candidate: dict[int, list[np.ndarray]], levels: list[int], box_px: float
) -> dict[str, Any]:
    """Per batch size: [detections, logits_p3, deltas_p3, ...] of two runs. The head outputs are compared
    elementwise; the detections' scores elementwise and their selections as sets per level."""
    raw_diff, raw_scale = max_abs_diff_and_scale(
        [a for b in reference for a in reference[b][1:]], [a for b in candidate for a in candidate[b][1:]]
    )
    rows = {b: out[0] for b, out in reference.items()}
    score_diff, agreement = compare_selections(rows, {b: out[0] for b, out in candidate.items()}, levels, box_px)
    return {
        "batches": list(reference),
        "raw_max_abs_diff": raw_diff,
        "raw_scale": raw_scale,
        "score_max_abs_diff": score_diff,
        "selection_agreement": agreement,
        "box_tolerance_px": box_px,
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
