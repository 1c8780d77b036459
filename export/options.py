"""What an export is asked to do: `ExportOptions` (the CLI's flags) and the checks every task shares."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.canvases import DEFAULT_CANVAS_SET
from export.engine import ENGINE_MODES
from focal import get_variant

if TYPE_CHECKING:
    from export.tasks import ExportTask


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
    image_size: tuple[int, int] | None = None  # None: the task's default (a classifier's input)
    canvases: list[tuple[int, int]] | None = None  # a detector's canvases (None: a canvas set)
    canvas_set: str | None = None  # a named set of canvases (`export.canvases`; None: the default)
    test_scale: tuple[int, int] | None = None  # (long, short) of a detector's keep-ratio resize
    fp16: bool = False
    int8: bool = False  # also a dynamically quantized int8 graph, which CPU serving then prefers
    uint8_input: bool | None = None  # the graphs take uint8 pixels and normalise them (None: the task's default)
    min_batch: int = 1
    opt_batch: int = 0  # 0: the task's default
    max_batch: int = 0
    out: Path | None = None
    engine: str = "auto"
    workspace_gib: float = 4.0
    timing_cache: Path | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    labels: Path | None = None
    model_version: str = "1"  # what the service reports as the model's version

    @property
    def hooks(self) -> ExportTask:
        """The task's export hooks (`export.tasks`); ExportError for an unknown task."""
        from export.tasks import get_task

        return get_task(self.task)

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    @property
    def input_uint8(self) -> bool:
        """Whether the served graphs take uint8 pixels: the option, else yes wherever the task offers it."""
        return self.hooks.no_uint8_reason is None if self.uint8_input is None else self.uint8_input

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The input sizes to export a graph for (a detector's canvases, largest first)."""
        return self.hooks.input_sizes(self)

    @property
    def size(self) -> tuple[int, int]:
        """The first (largest) input size: the manifest's own."""
        return self.sizes[0]

    @property
    def batch(self) -> tuple[int, int, int]:
        """(min, opt, max) of the batch profile, the task's defaults filled in."""
        opt, high = self.hooks.default_batch
        return self.min_batch, self.opt_batch or opt, self.max_batch or high

    @property
    def weights_role(self) -> str:
        """What the weights file holds: 'classifier', 'detector', or 'backbone' (a detector's backbone only)."""
        return self.hooks.weights_role(self)

    @property
    def untrained(self) -> bool:
        """Random-init, or a detector's backbone only (its FPN and head untrained): as meaningless either way."""
        return self.random_init or self.weights_role == "backbone"

    @property
    def weights_given(self) -> list[bool]:
        return [self.weights is not None, self.pretrained, self.random_init, self.backbone_weights is not None]

    def default_out(self) -> Path:
        sizes = self.sizes
        named = self.canvas_set or ("custom" if self.canvases else DEFAULT_CANVAS_SET)
        shape = f"{sizes[0][0]}x{sizes[0][1]}" if len(sizes) == 1 else f"canvases-{named}"
        suffix = ("-int8" if self.int8 else "") + ("-random-init" if self.random_init else "")
        return Path("artifacts") / f"{get_variant(self.variant).name}-{self.task}-{shape}-{self.precision}{suffix}"

    def validate(self) -> None:
        """The checks every task shares, then the task's own (`ExportTask.check`)."""
        hooks = self.hooks
        if self.engine not in ENGINE_MODES:
            raise ExportError(f"--engine must be one of {', '.join(ENGINE_MODES)}")
        if sum(self.weights_given) > 1:
            raise ExportError("give at most one of --weights, --pretrained, --random-init, --backbone-weights")
        low, opt, high = self.batch
        if not 1 <= low <= opt <= high:
            raise ExportError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {low}/{opt}/{high}")
        if low != 1:
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
            ("img_size", "use --image-size (a detector: --canvases)"),
            ("features_only", "feature backbones are for --task detect"),
        ):
            if key in self.model_kwargs:
                raise ExportError(f"--model-kwargs cannot set {key}: {why}")
        if not re.fullmatch(r"[0-9A-Za-z._-]{1,64}", self.model_version):
            raise ExportError(f"--model-version {self.model_version!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if self.labels is not None and not self.labels.is_file():
            raise ExportError(f"--labels {self.labels}: no such file")
        if self.uint8_input and hooks.no_uint8_reason is not None:
            raise ExportError(f"--uint8-input is not offered for --task {self.task}: {hooks.no_uint8_reason}")
        if self.int8 and hooks.no_int8_reason is not None:
            raise ExportError(f"--int8 is not offered for --task {self.task}: {hooks.no_int8_reason}")
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise ExportError(f"--out {self.out}: exists and is not a folder")
        hooks.check(self)


def read_label_file(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
