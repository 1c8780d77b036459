"""The export folder's contract: `manifest.json`, as typed models.

`python -m export` writes it; `python -m service`, its backends and
`python -m export.engine` read it. This module imports neither side, nor torch:
the serving images read manifests without the model code.

One manifest describes one export folder: the model and weights it came from,
the ONNX graphs and the one the service should run, the input and output
tensors, the preprocessing, the batch profile, the TensorRT engine (or why
there is none), the verification results and the sha256 of every artifact.
Each task adds its own section (`detection` for a detector) and its own
preprocess block; the `task` field tells them apart.

`FORMAT_VERSION` changes whenever a field changes meaning or shape; a reader
refuses other versions with the command that re-exports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION: Final = 2  # 2: typed; `engine` holds the engine's path and build facts (was a path + `engine_info`)

# What each canvas of a detector has of its own (`DetectManifest.canvases`, `canvas_views`).
_PER_CANVAS = ("onnx", "onnx_fp32", "input", "outputs", "graph", "verification", "engine", "engine_skipped_reason")

WeightsKind = Literal["file", "pretrained", "random-init"]
RANDOM_INIT: WeightsKind = "random-init"


class ManifestError(Exception):
    """A folder has no usable manifest (the message says why and what to do)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    name: str
    dtype: Literal["float32", "float16", "uint8"]
    shape: list[int | str] = Field(description="'batch' names the symbolic batch axis")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (everything after the batch axis)."""
        return tuple(int(d) for d in self.shape[1:])


class BatchProfile(_Strict):
    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> BatchProfile:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile must satisfy min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self


class Weights(_Strict):
    source: WeightsKind
    sha256: str | None
    seed: int | None = None  # random-init
    file: str | None = None
    path: str | None = Field(None, description="absolute path at export time (the PyTorch reference backend)")
    url: str | None = None
    adaptations: list[str] = Field(default_factory=list, description="what loading the checkpoint adapted")


class _Normalised(_Strict):
    """What every preprocess ends with: RGB in [0, 1], then (x - mean) / std, laid out NCHW; done by the
    host (the input is float32) or by the graph's first nodes (`normalise: graph`: the input is the
    uint8 RGB pixels, 0..255)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_range: str = "RGB scaled to [0, 1], then (x - mean) / std"
    layout: Literal["NCHW"] = "NCHW"
    normalise: Literal["host", "graph"] = "host"


class CropPreprocess(_Normalised):
    """Classification: the official evaluation transform, generalised to non-square inputs."""

    resize: Literal["cover_and_crop"] = "cover_and_crop"
    resize_to_cover: tuple[int, int] = Field(description="(height, width) the image is scaled to cover")
    crop: tuple[int, int] = Field(description="(height, width) of the centre crop: the model input")
    interpolation: Literal["bicubic"] = "bicubic"


def keep_ratio_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of an image after mmdetection's keep-ratio `Resize(scale=(long, short))`: the
    largest factor that keeps the long side within `long` and the short side within `short`, each
    side rounded as `int(side * factor + 0.5)` (at least 1)."""
    long, short = scale
    factor = min(long / max(width, height), short / min(width, height))
    return max(int(width * factor + 0.5), 1), max(int(height * factor + 0.5), 1)


class LetterboxPreprocess(_Normalised):
    """Detection: mmdetection's test transform. The image is resized keeping its aspect ratio
    (`keep_ratio_size` at `test_scale`) and placed top left on the smallest of the export's canvases
    that holds it, padded bottom/right. An image that no canvas holds at that size is fitted, smaller,
    into the canvas where it can be largest."""

    resize: Literal["letterbox"] = "letterbox"
    canvas: tuple[int, int] = Field(description="(height, width)")
    test_scale: tuple[int, int] | None = Field(
        None,
        description="(long, short) side limits of the keep-ratio resize; absent: the canvases' longest side and "
        "longest short side",
    )
    scale: str = "min(long / image_long, short / image_short); resized side = int(side * factor + 0.5)"
    pad: str = "bottom and right, value 0 after normalisation"
    interpolation: Literal["bilinear"] = "bilinear"
    normalise: Literal["host"] = "host"  # no uint8 pad colour normalises to 0: the host normalises


class GraphInfo(_Strict):
    node_count: int
    opset: int
    op_counts: dict[str, int]


class Engine(_Strict):
    """A built TensorRT engine: it runs only with this TensorRT version on this GPU type."""

    path: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: Literal["fp32", "fp16"]
    batch: BatchProfile
    onnx_sha256: str = Field(description="of the ONNX it was built from")
    onnx_data_sha256: str | None = Field(None, description="of the external-data file that ONNX reads its weights from")
    built_from: str
    strongly_typed: bool = Field(description="built as a strongly typed network: it computes in the ONNX's types")
    fp16_flag: bool = Field(
        False, description="built with TensorRT 10's FP16 flag (engines from before strong typing: rebuilt)"
    )
    tf32: bool = Field(True, description="fp32 layers may compute as TF32 (cleared in every engine built now)")


class DetectionLevel(_Strict):
    name: str
    stride: int
    size: tuple[int, int]
    candidates: int = Field(description="rows this level contributes to the output")


class Anchors(_Strict):
    strides: list[int]
    octave_base_scale: float
    scales_per_octave: int
    ratios: list[float]
    center_offset: float
    per_location: int


class DetectionPostprocess(_Strict):
    score_threshold: float
    nms: str
    iou_threshold: float
    max_detections: int


class CanvasGraphs(_Strict):
    """A detector's graphs for one more canvas (`DetectManifest.canvases`): what differs from the first."""

    canvas: tuple[int, int] = Field(description="(height, width)")
    onnx: str
    onnx_fp32: str
    input: TensorSpec
    outputs: list[TensorSpec] = Field(min_length=1, max_length=1)
    graph: GraphInfo
    levels: list[DetectionLevel]
    verification: dict[str, dict[str, Any]]
    engine: Engine | None = None
    engine_skipped_reason: str | None = None


class Detection(_Strict):
    """Everything needed to read a detector's output rows and finish its post-processing."""

    output_columns: list[str]
    coordinates: str
    canvas: tuple[int, int]
    levels: list[DetectionLevel]
    anchors: Anchors
    box_coder: dict[str, Any]
    selection: str
    postprocess: DetectionPostprocess
    neck: dict[str, Any]
    head: dict[str, Any]


class _ManifestBase(_Strict):
    format_version: Literal[2] = FORMAT_VERSION
    variant: str
    official_name: str | None
    model_version: str = Field(
        "1", pattern=r"^[0-9A-Za-z._-]{1,64}$", description="the version the service reports (Open Inference Protocol)"
    )
    input_size: tuple[int, int] = Field(description="(height, width) of the model input")
    num_classes: int = Field(ge=1)
    random_init: bool = Field(description="true when any part of the model is untrained")
    weights_role: Literal["classifier", "detector", "backbone"]
    weights: Weights
    precision: Literal["fp32", "fp16"] = Field(description="what the export produced for GPUs")
    onnx: str = Field(description="the graph a GPU runs (the fp16 one when precision is fp16)")
    onnx_fp32: str = Field(description="the fp32 graph (what runs on CPUs unless there is an int8 one)")
    onnx_int8: str | None = Field(
        None, description="the int8 graph a CPU runs instead of fp32: there only when the export was asked (--int8)"
    )
    onnx_data: str | None = Field(
        None, description="the external-data file the graphs keep their weights in, shared (absent: inside each)"
    )
    labels: str
    input: TensorSpec
    outputs: list[TensorSpec] = Field(min_length=1, max_length=1)
    batch: BatchProfile
    focal_config: dict[str, Any] = Field(description="FocalConfig keywords the model was built with")
    graph: GraphInfo
    verification: dict[str, dict[str, Any]]
    engine: Engine | None = None
    engine_skipped_reason: str | None = None
    sha256: dict[str, str] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict, description="what the export was made from (its reuse key)")
    versions: dict[str, str | None] = Field(default_factory=dict)
    created: str = ""

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]

    @model_validator(mode="after")
    def _input_matches_normalisation(self) -> _ManifestBase:
        """uint8 pixels exactly when the graph normalises them (and float32 when the host does)."""
        in_graph = getattr(self, "preprocess").normalise == "graph"  # noqa: B009 - each task's own preprocess
        if in_graph != (self.input.dtype == "uint8"):
            raise ValueError(f"input {self.input.dtype} with normalise: {'graph' if in_graph else 'host'}")
        return self

    @property
    def onnx_names(self) -> list[str]:
        """Every ONNX file the export serves, and the file of weights they share (if any)."""
        names = {self.onnx_int8} if self.onnx_int8 else set()
        for view in self.canvas_views():
            names |= {view.onnx, view.onnx_fp32}
        return sorted(names | ({self.onnx_data} if self.onnx_data else set()))

    def canvas_views(self) -> list[Any]:
        """One manifest per input size the export serves, each as if it were the only one (a detector
        may have several canvases; see `DetectManifest.canvases`). The first is this manifest's own."""
        return [self]

    def keep_canvas(self, view: Any) -> None:
        """Store what was changed in one of `canvas_views()` (its engine) back into this manifest."""
        if view is not self:
            for name in _PER_CANVAS:
                setattr(self, name, getattr(view, name))

    def write(self, folder: Path) -> Path:
        """Atomically: a reader never sees half a manifest."""
        path = folder / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        # Fields at their old meaning are left out (no --int8; normalised on the host; one canvas), so
        # readers of format 2 from before them still read the file.
        exclude: dict[str, Any] = {}
        if self.onnx_int8 is None:
            exclude["onnx_int8"] = True
        preprocess = getattr(self, "preprocess")  # noqa: B009
        exclude_preprocess = {"normalise"} if preprocess.normalise == "host" else set()
        if getattr(preprocess, "test_scale", 0) is None:
            exclude_preprocess.add("test_scale")
        if exclude_preprocess:
            exclude["preprocess"] = exclude_preprocess
        if not getattr(self, "canvases", True):  # one canvas: as before canvases existed
            exclude["canvases"] = True
        if self.onnx_data is None:
            exclude["onnx_data"] = True
        if self.engine is not None and self.engine.onnx_data_sha256 is None:
            exclude["engine"] = {"onnx_data_sha256"}
        tmp.write_text(self.model_dump_json(indent=2, exclude=exclude or None) + "\n")
        tmp.replace(path)
        return path

    def intact(self, folder: Path, names: list[str]) -> bool:
        """True when every named artifact exists and matches the sha256 recorded here."""
        return all(
            name in self.sha256 and (folder / name).is_file() and sha256_file(folder / name) == self.sha256[name]
            for name in names
        )


class ClassifyManifest(_ManifestBase):
    task: Literal["classify"] = "classify"
    preprocess: CropPreprocess


class DetectManifest(_ManifestBase):
    """The top-level graph fields, `preprocess.canvas` and `detection` describe the first canvas (the
    largest); `canvases` lists the others, each with its own graphs and engine (`canvas_views`)."""

    task: Literal["detect"] = "detect"
    preprocess: LetterboxPreprocess
    detection: Detection
    canvases: list[CanvasGraphs] = Field(default_factory=list, description="the export's further canvases")

    @property
    def canvas_sizes(self) -> list[tuple[int, int]]:
        return [self.preprocess.canvas, *(c.canvas for c in self.canvases)]

    @property
    def test_scale(self) -> tuple[int, int]:
        """(long, short) limits of the keep-ratio resize (`keep_ratio_size`)."""
        sizes = self.canvas_sizes
        return self.preprocess.test_scale or (max(max(s) for s in sizes), max(min(s) for s in sizes))

    def canvas_views(self) -> list[Any]:
        """(Shallow copies: every view shares this manifest's `sha256`, so a hash a view records is kept.)"""
        return [self.model_copy(update={"canvases": []}), *(self._view(c) for c in self.canvases)]

    def _view(self, graphs: CanvasGraphs) -> DetectManifest:
        return self.model_copy(
            update={
                **{name: getattr(graphs, name) for name in _PER_CANVAS},
                "input_size": graphs.canvas,
                "focal_config": {**self.focal_config, "img_size": list(graphs.canvas)},
                "preprocess": self.preprocess.model_copy(update={"canvas": graphs.canvas}),
                "detection": self.detection.model_copy(update={"canvas": graphs.canvas, "levels": graphs.levels}),
                "canvases": [],
            }
        )

    def keep_canvas(self, view: Any) -> None:
        if tuple(view.input_size) == tuple(self.input_size):
            super().keep_canvas(view)
            return
        for graphs in self.canvases:
            if tuple(graphs.canvas) == tuple(view.input_size):
                for name in _PER_CANVAS:
                    setattr(graphs, name, getattr(view, name))
                return
        raise KeyError(f"no canvas {view.input_size} in this manifest")

    @model_validator(mode="after")
    def _canvases_differ(self) -> DetectManifest:
        sizes = [tuple(s) for s in self.canvas_sizes]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"canvases listed twice: {sizes}")
        if tuple(self.detection.canvas) != tuple(self.preprocess.canvas):
            raise ValueError("detection.canvas and preprocess.canvas differ")
        return self


Manifest = ClassifyManifest | DetectManifest
TASKS: tuple[str, ...] = tuple(get_args(cls.model_fields["task"].annotation)[0] for cls in get_args(Manifest))
_MANIFEST: TypeAdapter[Manifest] = TypeAdapter(Annotated[Manifest, Field(discriminator="task")])


def parse_manifest(data: Any, where: str = "manifest") -> Manifest:
    """Validate a manifest's JSON data; `ManifestError` names each field that is wrong."""
    if isinstance(data, dict) and data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{where}: manifest format {data.get('format_version')}, this version reads {FORMAT_VERSION}; "
            "export the model again with python -m export"
        )
    if isinstance(data, dict) and data.get("task") not in TASKS:
        raise ManifestError(f"{where}: task {data.get('task')!r} cannot be served (only {', '.join(TASKS)})")
    try:
        return _MANIFEST.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ManifestError(f"{where}: invalid manifest ({problems})") from None


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest; `ManifestError` when it is missing, unreadable or of another format."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST_NAME} (is it a python -m export output folder?)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from None
    return parse_manifest(data, str(path))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
