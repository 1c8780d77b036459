"""The interface every task's export hooks implement (see `export.tasks`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from export.options import ExportOptions
from focal import FocalConfig
from manifest import Manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Graphs:
    """A task's exported fp32 graphs: the one served, and the one verification reads (the served one
    with extra outputs, or the served one itself)."""

    served: onnx.ModelProto
    verified: onnx.ModelProto


class ExportTask(ABC):
    name: str
    default_size: tuple[int, int]  # (height, width)
    default_batch: tuple[int, int]  # (opt, max) of the TensorRT profile
    whole_model_role: str  # `load_weights`' role for a state dict of the whole model
    # Why --int8 is not offered for this task; None where it is (the task implements verify_int8).
    no_int8_reason: str | None = "its int8 verification is not written yet"
    # Why the graphs cannot take uint8 pixels for this task (None: they do, by default; `export.uint8`).
    no_uint8_reason: str | None = None

    def input_sizes(self, opts: ExportOptions) -> list[tuple[int, int]]:
        """The input sizes to export a graph for, the manifest's own first."""
        return [opts.image_size or self.default_size]

    def test_scale(self, opts: ExportOptions) -> tuple[int, int] | None:
        """A detector's keep-ratio resize limits (long, short), recorded in the manifest; None elsewhere."""
        return None

    @abstractmethod
    def check(self, opts: ExportOptions) -> None:
        """Refuse options this task cannot honour (ExportError)."""

    @abstractmethod
    def weights_role(self, opts: ExportOptions) -> str:
        """What the weights file holds for these options: 'classifier', 'detector' or 'backbone'."""

    @abstractmethod
    def num_classes(self, opts: ExportOptions, state: dict[str, Any] | None) -> int:
        """The class count, from the options or the checkpoint."""

    @abstractmethod
    def default_labels(self, num_classes: int) -> list[str] | None:
        """Class names when --labels is not given (None: class_0, class_1, ...)."""

    @abstractmethod
    def build(self, config: FocalConfig) -> nn.Module:
        """The task's model, in eval mode, randomly initialised."""

    @abstractmethod
    def load_weights(self, model: nn.Module, state: dict[str, Any], role: str) -> list[str]:
        """Load a checkpoint's state dict strictly (CheckpointError); returns the adaptations made."""

    @abstractmethod
    def export(self, model: nn.Module, size: tuple[int, int], max_batch: int) -> Graphs:
        """The fp32 graphs (not yet gated or saved)."""

    @abstractmethod
    def verify_fp32(self, model: nn.Module, graph: onnx.ModelProto, size: tuple[int, int]) -> dict[str, Any]:
        """onnxruntime against PyTorch; VerificationError beyond the bound; returns the report."""

    @abstractmethod
    def verify_fp16(
        self, model: nn.Module, fp32: onnx.ModelProto, fp16: onnx.ModelProto, size: tuple[int, int]
    ) -> dict[str, Any]:
        """The fp16 graph against the fp32 one; VerificationError beyond the bound; returns the report."""

    def verify_int8(self, fp32: Path, int8: Path, size: tuple[int, int]) -> dict[str, Any]:
        """The int8 graph against the fp32 one (files); VerificationError beyond the bound; returns the report."""
        raise NotImplementedError(self.no_int8_reason)

    @abstractmethod
    def manifest(
        self, model: nn.Module, size: tuple[int, int], fields: dict[str, Any], opts: ExportOptions
    ) -> Manifest:
        """The manifest: the task-independent `fields`, plus the task's outputs, preprocess and section."""

    def add_canvas(self, first: Manifest, other: Manifest) -> None:
        """Record `other` (the manifest of one more input size's graphs) in `first` (a task with several)."""
        raise NotImplementedError(f"a {self.name} export has one input size")

    @abstractmethod
    def summary(self, report: dict[str, Any]) -> str:
        """One line of a verification report for the progress log."""
