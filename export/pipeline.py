"""The export, step by step, the same for every task: weights -> PyTorch model -> ONNX (gated, verified)
-> fp16 (verified) -> engine -> manifest. What differs between tasks is asked of `export.tasks`."""

from __future__ import annotations

import contextlib
import hashlib
import platform
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from export import tensorrt_engine
from export.canvases import WEIGHTS_DATA
from export.engine import ensure_engines
from export.fp16 import convert_to_fp16
from export.graph_gate import check_graph
from export.int8 import quantize_int8
from export.onnx_export import INPUT_NAME, OPSET, keep_outputs, save_onnx
from export.options import ExportError, ExportOptions, read_label_file
from export.shared_weights import share_weights
from export.tasks import ExportTask
from export.tasks.base import IMAGENET_MEAN, IMAGENET_STD
from export.uint8 import verify_uint8_input, with_uint8_input
from export.verify import FP16_RELATIVE_TOLERANCE, FP32_RELATIVE_TOLERANCE
from export.weights import (
    WeightsError,
    WeightsSource,
    local_weights,
    pretrained_weights,
    random_init,
    seed_random_init,
)
from focal import FocalConfig, get_variant
from focal.checkpoint import read_state_dict
from manifest import (
    MANIFEST_NAME,
    RANDOM_INIT,
    GraphInfo,
    Manifest,
    ManifestError,
    TensorSpec,
    read_manifest,
    sha256_file,
)

INT8_ONNX = "model.int8.onnx"  # of an export with one input size (`graph_names`)
LABELS = "labels.txt"


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


def run_export(opts: ExportOptions, log: Callable[[str], None] = print) -> Manifest:
    """Run the whole export; returns the manifest written to the output folder."""
    opts.validate()
    task = opts.hooks
    out = opts.out or opts.default_out()
    out.mkdir(parents=True, exist_ok=True)
    sizes = opts.sizes
    per_size = 3 + opts.fp16 + opts.int8 + opts.input_uint8
    progress = Progress(3 + len(sizes) * per_size + (len(sizes) > 1), log)
    variant = get_variant(opts.variant)

    with progress.step("weights"):
        source = _resolve_weights(opts, variant.checkpoint_url, log)
        state = read_state_dict(source.path) if source.path else None
        if source.kind == RANDOM_INIT:
            log("      RANDOM-INIT: untrained weights; predictions are meaningless (for testing the pipeline)")
        elif opts.weights_role == "backbone":
            log("      backbone weights only: the FPN and the detection head are RANDOM-INIT (fine-tune before use)")

    num_classes = task.num_classes(opts, state)
    try:
        config = variant.config(**{**opts.model_kwargs, "img_size": opts.size, "num_classes": num_classes})
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ExportError(f"cannot build {variant.name}: {exc}") from exc
    inputs = {
        "variant": variant.name,
        "task": opts.task,
        "input_sizes": [list(size) for size in sizes],
        "test_scale": list(scale) if (scale := task.test_scale(opts)) else None,
        "weights_role": opts.weights_role,
        "precision": opts.precision,
        "int8": opts.int8,
        "uint8_input": opts.input_uint8,
        "batch": list(opts.batch),
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
    previous = _previous_manifest(out)
    if previous is not None and previous.inputs == inputs and previous.intact(out, [*previous.onnx_names, LABELS]):
        manifest = previous
        progress.total = progress.done + 3
        with progress.step(f"graphs ({len(manifest.onnx_names)} files)"):
            log("      unchanged inputs and artifacts (sha256 verified): reusing")
    else:
        # A manifest must never describe artifacts it did not verify: drop the old one first,
        # so an interrupted or failed export leaves no manifest at all; and the graphs and engines
        # an earlier export with other options left.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for stale in [*out.glob("model*.onnx"), *out.glob("model*.engine"), out / WEIGHTS_DATA]:
            stale.unlink(missing_ok=True)
        manifest = _export_fresh(opts, task, out, progress, config, state, source, log)
        manifest.inputs = inputs
        manifest.versions = package_versions()
        manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    manifest.model_version = opts.model_version  # a label only: a new version of the same export reuses it

    with progress.step("TensorRT engine" + ("s" if len(sizes) > 1 else "")):
        try:
            ensure_engines(
                out, manifest, opts.engine, opts.workspace_gib, opts.timing_cache, log=lambda m: log(f"      {m}")
            )
        except tensorrt_engine.EngineError as exc:
            raise ExportError(str(exc)) from exc

    with progress.step("manifest"):
        engines = [view.engine.path for view in manifest.canvas_views() if view.engine]
        names = [*manifest.onnx_names, LABELS, *engines]
        # Reused artifacts were verified against these hashes, built engines hashed as they were written.
        manifest.sha256 = {name: manifest.sha256.get(name) or sha256_file(out / name) for name in names}
        log(f"      wrote {manifest.write(out)}")
    return manifest


def _previous_manifest(out: Path) -> Manifest | None:
    try:
        return read_manifest(out)
    except ManifestError:
        return None  # none, or of another format: export afresh


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


def graph_names(size: tuple[int, int], several: bool) -> dict[str, str]:
    """The files of one input size's graphs: `model.fp32.onnx`, ...; `model.480x640.fp32.onnx`, ... when
    the export has several sizes (a detector's canvases)."""
    stem = f"model.{size[0]}x{size[1]}" if several else "model"
    return {kind: f"{stem}.{kind}.onnx" for kind in ("fp32", "fp16", "int8")}


def _export_fresh(
    opts: ExportOptions,
    task: ExportTask,
    out: Path,
    progress: Progress,
    config: FocalConfig,
    state: dict[str, Any] | None,
    source: WeightsSource,
    log: Callable[[str], None],
) -> Manifest:
    """Every input size's graphs, exported and verified; the manifest of the first, holding the others'."""
    sizes = opts.sizes
    labels = _labels(opts, task, config.num_classes)
    (out / LABELS).write_text("\n".join(labels) + "\n")
    manifests: list[Manifest] = []
    adaptations: list[str] = []
    for size in sizes:
        try:
            sized = config.replace(img_size=size)
        except (TypeError, ValueError, NotImplementedError) as exc:
            raise ExportError(f"cannot build {opts.variant} at {size[0]}x{size[1]}: {exc}") from exc
        where = f" [{size[0]}x{size[1]}]" if len(sizes) > 1 else ""
        with progress.step("PyTorch model" + where):
            try:
                seed_random_init()
                model = task.build(sized)
            except (ValueError, TypeError, NotImplementedError) as exc:
                raise ExportError(f"cannot build {opts.variant}: {exc}") from exc
            if not manifests:
                notes = task.load_weights(model, state, opts.weights_role) if state is not None else []
                adaptations, first_weights = notes, model.state_dict()
            elif state is not None and opts.weights_role != "backbone":
                notes = task.load_weights(model, state, opts.weights_role)  # the checkpoint, adapted to this size
            else:  # what was random in the first size's model is the same in every size's
                notes = task.load_weights(model, first_weights, task.whole_model_role)
            for note in notes:
                log(f"      checkpoint adapted: {note}")
            log(f"      {opts.variant} {opts.task}, input {size[0]}x{size[1]}, {config.num_classes} classes")
        names = graph_names(size, len(sizes) > 1)
        fields = _export_graphs(opts, task, out, progress, model, size, names, where, log)
        fields.update(
            variant=get_variant(opts.variant).name,
            official_name=get_variant(opts.variant).official_name,
            num_classes=config.num_classes,
            random_init=opts.untrained,
            weights_role=opts.weights_role,
            weights=source.manifest_entry(adaptations),
            precision=opts.precision,
            labels=LABELS,
            batch=dict(zip(("min", "opt", "max"), opts.batch, strict=True)),
            focal_config={k: v for k, v in vars(sized).items() if k != "ignored_training_kwargs"},
        )
        manifests.append(task.manifest(model, size, fields, opts))
    first = manifests[0]
    for other in manifests[1:]:
        task.add_canvas(first, other)
    if len(sizes) > 1:
        with progress.step("shared weights"):
            report = share_weights(out, first.onnx_names, WEIGHTS_DATA)  # every canvas's, now in `first`
            first.onnx_data = WEIGHTS_DATA
            log(
                f"      {len(first.onnx_names) - 1} graphs keep their weights in {WEIGHTS_DATA}: "
                f"{report.shared_bytes / 2**20:.1f} MiB there, "
                f"{report.total_bytes / 2**20:.1f} MiB if each held its own"
            )
    return first


def _export_graphs(
    opts: ExportOptions,
    task: ExportTask,
    out: Path,
    progress: Progress,
    model: Any,
    size: tuple[int, int],
    names: dict[str, str],
    where: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One input size: the ONNX graphs (fp32, and fp16, int8, uint8 input as asked), each gated and
    verified; the manifest fields that describe them."""
    with progress.step("ONNX export + graph gate" + where):
        graphs = task.export(model, size, opts.batch[2])
        report = check_graph(graphs.served)
        save_onnx(graphs.served, out / names["fp32"])
        log(f"      {report.node_count} nodes, opset {report.opset}, every op supported by TensorRT's parser")

    verification: dict[str, dict[str, Any]] = {}
    with progress.step("verification" + where):
        verification["fp32_vs_torch"] = task.verify_fp32(model, graphs.verified, size)
        log(f"      onnxruntime vs PyTorch at batch 1 and 3: {task.summary(verification['fp32_vs_torch'])}")

    if opts.fp16:
        with progress.step("fp16 ONNX + verification" + where):
            verified16 = convert_to_fp16(graphs.verified)
            verification["fp16_vs_fp32"] = task.verify_fp16(model, graphs.verified, verified16, size)
            served16 = keep_outputs(verified16, [o.name for o in graphs.served.graph.output])
            check_graph(served16)
            save_onnx(served16, out / names["fp16"])
            log(f"      fp16 vs fp32 (onnxruntime): {task.summary(verification['fp16_vs_fp32'])}")

    if opts.int8:
        with progress.step("int8 ONNX + verification" + where):
            quantize_int8(out / names["fp32"], out / names["int8"])
            verification["int8_vs_fp32"] = task.verify_int8(out / names["fp32"], out / names["int8"], size)
            log(f"      int8 vs fp32 (onnxruntime): {task.summary(verification['int8_vs_fp32'])}")

    if opts.input_uint8:  # after fp16 and int8: converting the prefix too would round its constants to fp16
        with progress.step("uint8 input + verification" + where):
            served = [names["fp32"]] + [names["fp16"]] * opts.fp16 + [names["int8"]] * opts.int8
            uint8 = _uint8_inputs(out, served, names, size)
            verification["uint8_input_vs_float"] = uint8["verification"]
            report = uint8["gate"]  # the served graph, as the manifest describes it
            log(
                f"      uint8 [N,3,{size[0]},{size[1]}] input, normalised in the graph; against float input: "
                f"max {verification['uint8_input_vs_float']['relative_diff']:.1e} of the output scale"
            )

    height, width = size
    return {
        "input_size": size,
        "onnx": names["fp16"] if opts.fp16 else names["fp32"],
        "onnx_fp32": names["fp32"],
        "onnx_int8": names["int8"] if opts.int8 else None,
        "input": TensorSpec(
            name=INPUT_NAME, dtype="uint8" if opts.input_uint8 else "float32", shape=["batch", 3, height, width]
        ),
        "graph": GraphInfo(node_count=report.node_count, opset=report.opset, op_counts=report.op_counts),
        "verification": verification,
    }


def _uint8_inputs(out: Path, names: list[str], files: dict[str, str], size: tuple[int, int]) -> dict[str, Any]:
    """Give every served graph uint8 input (`export.uint8`), each verified against its float-input self
    and the fp32 one through the graph gate again; the gate's report of the fp32 graph, and the worst
    verification (per graph under "graphs")."""
    reports: dict[str, dict[str, float]] = {}
    gate = None
    for name in names:
        float_graph = onnx.load(str(out / name))
        graph = with_uint8_input(float_graph, IMAGENET_MEAN, IMAGENET_STD)
        tolerance = FP32_RELATIVE_TOLERANCE if name == files["fp32"] else FP16_RELATIVE_TOLERANCE
        reports[name] = verify_uint8_input(float_graph, graph, size, IMAGENET_MEAN, IMAGENET_STD, tolerance)
        if name != files["int8"]:  # the int8 graph is for onnxruntime on CPUs, never for TensorRT
            report = check_graph(graph)
            gate = gate or report
        save_onnx(graph, out / name)
    worst = max(reports.values(), key=lambda r: r["relative_diff"])
    return {
        "gate": gate,
        "verification": {**worst, "graphs": reports, "checked_with": "onnxruntime CPU", "normalise": "graph"},
    }


def _labels(opts: ExportOptions, task: ExportTask, num_classes: int) -> list[str]:
    if opts.labels is not None:
        names = read_label_file(opts.labels)
        if len(names) != num_classes:
            raise ExportError(f"--labels {opts.labels}: {len(names)} names for {num_classes} classes")
        return names
    return task.default_labels(num_classes) or [f"class_{i}" for i in range(num_classes)]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "focal-serve",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxscript",
        "onnxconverter-common",
        "tensorrt",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def code_fingerprint() -> str:
    """sha256 over the model, export and manifest source: a code change invalidates earlier exports."""
    import export
    import focal
    import manifest

    digest = hashlib.sha256()
    for package in (Path(focal.__file__).parent, Path(export.__file__).parent, Path(manifest.__file__).parent):
        for path in sorted(package.rglob("*.py")):
            digest.update(path.relative_to(package.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
