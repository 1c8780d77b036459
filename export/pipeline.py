"""The export, step by step: weights -> PyTorch model -> ONNX (gated, verified) -> fp16 -> engine -> manifest."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from export import tensorrt_engine
from export.engine import ENGINE, ENGINE_MODES, ensure_engine
from export.fp16 import convert_to_fp16
from export.graph_gate import check_graph
from export.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    artifacts_intact,
    classification_preprocess,
    code_fingerprint,
    letterbox_preprocess,
    package_versions,
    read_manifest,
    write_manifest,
)
from export.onnx_export import INPUT_NAME, OPSET, export_onnx, keep_outputs, save_onnx
from export.verify import (
    verify_detection_fp16,
    verify_detection_fp32,
    verify_fp16,
    verify_fp32,
)
from export.weights import (
    RANDOM_INIT,
    WeightsError,
    WeightsSource,
    local_weights,
    pretrained_weights,
    random_init,
    seed_random_init,
    sha256_file,
)
from focal import CheckpointAdaptationWarning, FocalTransformer, get_variant, imagenet1k_labels, load_checkpoint
from focal.checkpoint import CheckpointError, read_state_dict
from focal.detection import (
    FocalRetinaNet,
    RetinaNetConfig,
    is_detection_state_dict,
    load_backbone_weights,
    load_detection_checkpoint,
)
from focal.labels import coco_labels

TASKS = ("classify", "detect")
DEFAULT_SIZES = {"classify": (224, 224), "detect": (640, 640)}
# (opt, max) batch of the TensorRT profile; a 640x640 detector costs ~16x a 224 classifier per image.
DEFAULT_BATCHES = {"classify": (8, 32), "detect": (2, 8)}
DETECTIONS = "detections"
FP32_ONNX = "model.fp32.onnx"
FP16_ONNX = "model.fp16.onnx"
VERIFY_ONNX = "model.fp32.verify.onnx"  # detection graph with the raw head outputs, deleted after verification
LABELS = "labels.txt"


class ExportError(Exception):
    """The export cannot go on; the message is the one line of cause the CLI prints."""


@dataclass
class ExportOptions:
    variant: str
    task: str = "classify"
    weights: Path | None = None
    pretrained: bool = False
    random_init: bool = False
    backbone_weights: Path | None = None
    image_size: tuple[int, int] | None = None  # None: the task's default (224x224, or a 640x640 canvas)
    fp16: bool = False
    min_batch: int = 1
    opt_batch: int = 0  # 0: the task's default (8 and 32 for classify, 2 and 8 for detect)
    max_batch: int = 0
    out: Path | None = None
    engine: str = "auto"
    workspace_gib: float = 4.0
    timing_cache: Path | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    labels: Path | None = None

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def __post_init__(self) -> None:
        opt, high = DEFAULT_BATCHES.get(self.task, DEFAULT_BATCHES["classify"])
        self.opt_batch = self.opt_batch or opt
        self.max_batch = self.max_batch or high

    @property
    def size(self) -> tuple[int, int]:
        return self.image_size or DEFAULT_SIZES[self.task]

    @property
    def weights_role(self) -> str:
        """What the weights file holds: a whole classifier or detector, or only the detector's backbone."""
        if self.task == "classify":
            return "classifier"
        return "backbone" if self.backbone_weights is not None or self.pretrained else "detector"

    def default_out(self) -> Path:
        h, w = self.size
        suffix = "-random-init" if self.random_init else ""
        return Path("artifacts") / f"{get_variant(self.variant).name}-{self.task}-{h}x{w}-{self.precision}{suffix}"

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ExportError(f"--task must be one of {', '.join(TASKS)}")
        if self.engine not in ENGINE_MODES:
            raise ExportError(f"--engine must be one of {', '.join(ENGINE_MODES)}")
        given = [self.weights is not None, self.pretrained, self.random_init, self.backbone_weights is not None]
        if sum(given) > 1:
            raise ExportError("give at most one of --weights, --pretrained, --random-init, --backbone-weights")
        if self.task == "classify" and self.backbone_weights is not None:
            raise ExportError("--backbone-weights is for --task detect; a classifier takes --weights")
        if self.task == "detect":
            if not any(given):
                raise ExportError(
                    "--task detect needs weights: --weights (an mmdetection RetinaNet checkpoint), "
                    "--backbone-weights or --pretrained (an ImageNet backbone; FPN and head untrained), "
                    "or --random-init (no official detection checkpoints exist)"
                )
            h, w = self.size
            if h % 32 or w % 32 or min(h, w) < 64:
                raise ExportError(f"--image-size {h}x{w}: a detection canvas needs sides that are multiples of 32")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(
                "batch sizes must satisfy 1 <= min <= opt <= max, "
                f"got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        if self.min_batch != 1:
            raise ExportError("--min-batch must be 1: the service sends single requests as batches of 1")
        if not self.workspace_gib > 0:  # also refuses NaN
            raise ExportError("--workspace-gib must be a positive number")
        try:
            get_variant(self.variant)
        except KeyError as exc:
            raise ExportError(str(exc.args[0])) from exc
        if not isinstance(self.model_kwargs, dict):
            raise ExportError("--model-kwargs must be a JSON object of official constructor keywords")
        for key, why in (
            ("img_size", "use --image-size"),
            ("features_only", "feature backbones are for --task detect"),
        ):
            if key in self.model_kwargs:
                raise ExportError(f"--model-kwargs cannot set {key}: {why}")
        if self.task == "detect" and "num_classes" in self.model_kwargs:
            raise ExportError(
                "--model-kwargs num_classes: a detector takes its classes from its checkpoint or --labels"
            )
        classes = self.model_kwargs.get("num_classes", 1)
        if not isinstance(classes, int) or classes < 1:
            raise ExportError("--model-kwargs num_classes must be a positive integer (the export serves a classifier)")
        if self.labels is not None and not self.labels.is_file():
            raise ExportError(f"--labels {self.labels}: no such file")
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise ExportError(f"--out {self.out}: exists and is not a folder")


class Progress:
    """Numbered steps with timings on the log."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.log, self.done = total, log, 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.done += 1
        self.log(f"[{self.done}/{self.total}] {title} ...")
        start = time.perf_counter()
        yield
        self.log(f"      {title}: done in {time.perf_counter() - start:.1f} s")


def run_export(opts: ExportOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole export; returns the manifest written to the output folder."""
    opts.validate()
    out = opts.out or opts.default_out()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(7 if opts.fp16 else 6, log)
    variant = get_variant(opts.variant)

    with progress.step("weights"):
        source = _resolve_weights(opts, variant.checkpoint_url, log)
        state = read_state_dict(source.path) if source.path else None
        if source.kind == RANDOM_INIT:
            log("      RANDOM-INIT: untrained weights; predictions are meaningless (for testing the pipeline)")
        elif opts.weights_role == "backbone":
            log("      backbone weights only: the FPN and the detection head are RANDOM-INIT (fine-tune before use)")

    num_classes = _num_classes(opts, state)
    try:
        config = variant.config(**{**opts.model_kwargs, "img_size": opts.size, "num_classes": num_classes})
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ExportError(f"cannot build {variant.name}: {exc}") from exc
    inputs = {
        "variant": variant.name,
        "task": opts.task,
        "input_size": list(opts.size),
        "weights_role": opts.weights_role,
        "precision": opts.precision,
        "batch": [opts.min_batch, opts.opt_batch, opts.max_batch],
        "model_kwargs": opts.model_kwargs,
        "num_classes": config.num_classes,
        "weights": source.fingerprint(),
        "labels": sha256_file(opts.labels) if opts.labels else None,
        "opset": OPSET,
        "code": code_fingerprint(),
        "versions": {
            k: v
            for k, v in package_versions().items()
            if k in ("torch", "onnx", "onnxscript", "onnxconverter-common", "onnxruntime", "onnxruntime-gpu")
        },
    }
    onnx_files = [FP32_ONNX] + ([FP16_ONNX] if opts.fp16 else [])
    previous = read_manifest(out)
    reuse = (
        previous is not None
        and previous.get("inputs") == inputs
        and artifacts_intact(out, previous, [*onnx_files, LABELS])
    )

    if reuse:
        assert previous is not None
        manifest = previous
        titles = ["PyTorch model", "ONNX export + graph gate", "verification"]
        for title in titles + (["fp16 ONNX + verification"] if opts.fp16 else []):
            with progress.step(title):
                log("      unchanged inputs and artifacts (sha256 verified): reusing")
    else:
        # A manifest must never describe artifacts it did not verify: drop the old one first,
        # so an interrupted or failed export leaves no manifest at all.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        manifest = _export_fresh(opts, out, progress, config, state, source, log)
        manifest["inputs"] = inputs
        manifest["versions"] = package_versions()
        manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

    with progress.step("TensorRT engine"):
        _engine_step(opts, out, manifest, log)

    with progress.step("manifest"):
        manifest["sha256"] = {
            name: sha256_file(out / name) for name in [*onnx_files, LABELS, *([ENGINE] if manifest["engine"] else [])]
        }
        path = write_manifest(out, manifest)
        log(f"      wrote {path}")
    return manifest


def _num_classes(opts: ExportOptions, state: dict[str, Any] | None) -> int:
    if opts.task == "detect":
        if opts.weights_role == "detector" and state is not None and "bbox_head.retina_cls.bias" in state:
            return int(state["bbox_head.retina_cls.bias"].shape[0]) // RetinaNetConfig().anchors.per_location
        if opts.labels is not None:
            return len(_read_label_file(opts.labels))
        return len(coco_labels())
    classes = opts.model_kwargs.get("num_classes")
    if classes is None and state is not None and "head.weight" in state:
        classes = int(state["head.weight"].shape[0])
    return int(classes or 1000)


def _resolve_weights(opts: ExportOptions, url: str, log: Callable[[str], None]) -> WeightsSource:
    try:
        if opts.random_init:
            return random_init()
        if opts.weights is not None:
            return local_weights(opts.weights)
        if opts.backbone_weights is not None:
            return local_weights(opts.backbone_weights)
        return pretrained_weights(url, log=lambda m: log(f"      {m}"))
    except WeightsError as exc:
        raise ExportError(str(exc)) from exc


def _export_fresh(
    opts: ExportOptions,
    out: Path,
    progress: Progress,
    config: Any,
    state: dict[str, Any] | None,
    source: WeightsSource,
    log: Callable[[str], None],
) -> dict[str, Any]:
    size = opts.size
    with progress.step("PyTorch model"):
        model, adaptations = _build_model(opts, config, state)
        for note in adaptations:
            log(f"      checkpoint adapted: {note}")
        labels = _labels(opts, config.num_classes)
        (out / LABELS).write_text("\n".join(labels) + "\n")
        what = "canvas" if opts.task == "detect" else "input"
        log(f"      {opts.variant} {opts.task}, {what} {size[0]}x{size[1]}, {config.num_classes} classes")

    detector = model if isinstance(model, FocalRetinaNet) else None
    with progress.step("ONNX export + graph gate"):
        if detector is not None:
            # Exported with the raw head outputs too, for verification; the served graph keeps only DETECTIONS.
            raw_names = [f"{kind}_p{3 + i}" for i in range(len(detector.level_sizes)) for kind in ("logits", "deltas")]
            raw_proto = export_onnx(
                _WithRaw(detector), out / VERIFY_ONNX, size, [DETECTIONS, *raw_names], max_batch=opts.max_batch
            )
            proto = keep_outputs(raw_proto, [DETECTIONS])
            save_onnx(proto, out / FP32_ONNX)
        else:
            proto = export_onnx(model, out / FP32_ONNX, size, ["logits"], max_batch=opts.max_batch)
        report = check_graph(proto)
        log(f"      {report.node_count} nodes, opset {report.opset}, every op supported by TensorRT's parser")

    with progress.step("verification"):
        verification: dict[str, Any] = {}
        if detector is not None:
            try:
                result = verify_detection_fp32(detector, out / VERIFY_ONNX, size)
            finally:
                (out / VERIFY_ONNX).unlink(missing_ok=True)
            verification["fp32_vs_torch"] = result.as_dict()
            log(
                "      onnxruntime vs PyTorch at batch 1 and 3: head outputs max |diff| "
                f"{result.raw_max_abs_diff:.2e}, candidate scores {result.score_max_abs_diff:.2e}, "
                f"same candidates {result.selection_agreement:.1%}"
            )
        else:
            fp32 = verify_fp32(model, out / FP32_ONNX, size)
            log(
                f"      onnxruntime vs PyTorch at batch 1 and 3: max |diff| {fp32.max_abs_diff:.2e} "
                f"({fp32.relative:.1e} of scale)"
            )
            verification["fp32_vs_torch"] = fp32.as_dict()

    if opts.fp16:
        with progress.step("fp16 ONNX + verification"):
            fp16_proto = convert_to_fp16(proto, out / FP16_ONNX)
            check_graph(fp16_proto)
            if detector is not None:
                det16 = verify_detection_fp16(out / FP32_ONNX, out / FP16_ONNX, size, detector.level_candidates)
                verification["fp16_vs_fp32"] = {**det16.as_dict(), "checked_with": "onnxruntime CPU"}
                log(
                    f"      fp16 vs fp32 (onnxruntime): candidate scores max |diff| {det16.score_max_abs_diff:.2e}, "
                    f"same candidates {det16.selection_agreement:.1%}"
                )
            else:
                fp16 = verify_fp16(out / FP32_ONNX, out / FP16_ONNX, size)
                verification["fp16_vs_fp32"] = {**fp16.as_dict(), "checked_with": "onnxruntime CPU"}
                log(
                    f"      fp16 vs fp32 (onnxruntime): max |diff| {fp16.max_abs_diff:.2e} "
                    f"({fp16.relative:.1e} of scale), top-1 agreement {fp16.top1_agreement:.0%}"
                )

    height, width = size
    manifest = {
        "format_version": FORMAT_VERSION,
        "variant": get_variant(opts.variant).name,
        "official_name": get_variant(opts.variant).official_name,
        "task": opts.task,
        "input_size": [height, width],
        "num_classes": config.num_classes,
        # A backbone-only detector has an untrained FPN and head: as meaningless as random-init.
        "random_init": source.kind == RANDOM_INIT or opts.weights_role == "backbone",
        "weights": {**source.manifest_entry(), "adaptations": adaptations},
        "precision": opts.precision,
        "onnx": FP16_ONNX if opts.fp16 else FP32_ONNX,
        "onnx_fp32": FP32_ONNX,
        "weights_role": opts.weights_role,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, height, width]},
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", config.num_classes]}],
        "batch": {"min": opts.min_batch, "opt": opts.opt_batch, "max": opts.max_batch},
        "labels": LABELS,
        "preprocess": classification_preprocess(size),
        "model_config": {k: v for k, v in vars(config).items() if k != "ignored_training_kwargs"},
        "graph": {"node_count": report.node_count, "opset": report.opset, "op_counts": report.op_counts},
        "verification": verification,
        "engine": None,
        "engine_info": None,
        "engine_skipped_reason": None,
    }
    if detector is not None:
        rows = detector.num_candidates
        manifest["outputs"] = [{"name": DETECTIONS, "dtype": "float32", "shape": ["batch", rows, 6]}]
        manifest["preprocess"] = letterbox_preprocess(size)
        manifest["detection"] = detector.describe()
    return manifest


class _WithRaw(torch.nn.Module):
    """The detector with its per-level head outputs as extra graph outputs (for verification only)."""

    def __init__(self, model: FocalRetinaNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.model.forward_raw(x)
        return (self.model.select_and_decode(raw), *(t for level in raw for t in level))


def _build_model(
    opts: ExportOptions, config: Any, state: dict[str, Any] | None
) -> tuple[FocalTransformer | FocalRetinaNet, list[str]]:
    try:
        seed_random_init()
        model: FocalTransformer | FocalRetinaNet
        if opts.task == "detect":
            model = FocalRetinaNet(config, RetinaNetConfig(num_classes=config.num_classes)).eval()
        else:
            model = FocalTransformer(config).eval()
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ExportError(f"cannot build {opts.variant}: {exc}") from exc
    if state is None:
        return model, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointAdaptationWarning)
        if isinstance(model, FocalTransformer):
            if is_detection_state_dict(state):
                raise CheckpointError(
                    "this is a detection checkpoint (neck/bbox_head keys); export it with --task detect"
                )
            return model, load_checkpoint(model, state).adaptations
        if opts.weights_role == "backbone":
            if is_detection_state_dict(state):
                raise CheckpointError("--backbone-weights got a detection checkpoint; give it as --weights instead")
            return model, load_backbone_weights(model, state).adaptations
        if not is_detection_state_dict(state):
            raise CheckpointError(
                "--weights for --task detect must be an mmdetection RetinaNet checkpoint (backbone./neck./bbox_head. "
                "keys); this one has none of the neck or head: for an ImageNet checkpoint use --backbone-weights"
            )
        return model, load_detection_checkpoint(model, state).adaptations


def _read_label_file(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _labels(opts: ExportOptions, num_classes: int) -> list[str]:
    if opts.labels is not None:
        names = _read_label_file(opts.labels)
        if len(names) != num_classes:
            raise ExportError(f"--labels {opts.labels}: {len(names)} names for {num_classes} classes")
        return names
    if opts.task == "detect" and num_classes == len(coco_labels()):
        return list(coco_labels())
    if opts.task == "classify" and num_classes == 1000:
        return list(imagenet1k_labels())
    return [f"class_{i}" for i in range(num_classes)]


def _engine_step(opts: ExportOptions, out: Path, manifest: dict[str, Any], log: Callable[[str], None]) -> None:
    try:
        ensure_engine(
            out, manifest, opts.engine, opts.workspace_gib, opts.timing_cache, log=lambda m: log(f"      {m}")
        )
    except tensorrt_engine.EngineError as exc:
        raise ExportError(str(exc)) from exc
