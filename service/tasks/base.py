"""The interface every task's serving side implements (see `service.tasks`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from fastapi import APIRouter
from PIL import Image

from manifest import Manifest

if TYPE_CHECKING:
    from service.models import Model


class Placed(Protocol):
    """An image after the task's transform: the model input, and whatever the inverse needs."""

    @property
    def pixels(self) -> np.ndarray: ...  # the model input of one image: float32 normalised, or uint8 pixels


@dataclass(frozen=True)
class ModelInput:
    """A sample a request sent as the model input itself (the Open Inference Protocol's tensor input)."""

    pixels: np.ndarray


class Transform(Protocol):
    """Image -> model input, built from the manifest's preprocess block."""

    @property
    def draft_short_side(self) -> int: ...  # a decoded short side this long is enough (JPEG draft decoding)

    def to_canvas(self, image: Image.Image, full_size: tuple[int, int]) -> Placed:
        """`image` (RGB, upright, possibly decoded at reduced scale) of full size `full_size` (width, height)."""
        ...


@dataclass(frozen=True)
class TensorMeta:
    """A tensor as the Open Inference Protocol's model metadata lists it (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


class ProtocolOutputs(Protocol):
    """A task's outputs in the Open Inference Protocol (`service.v2`): named tensors per image."""

    # True when `finish` is heavy enough (NMS) to run in the thread pool; a light one (a softmax) runs
    # on the event loop, which costs less than the hop to a thread and back
    finish_blocks: bool

    def outputs(self, manifest: Manifest) -> list[TensorMeta]:
        """What the model metadata lists, in order."""
        ...

    def parameters(self, model: Model, parameters: Mapping[str, Any]) -> Any:
        """The request's task parameters, checked before anything runs (`errors.InvalidParameter`)."""
        ...

    def finish(self, model: Model, row: np.ndarray, placed: Placed, parameters: Any) -> dict[str, np.ndarray]:
        """One image's model output -> its value of every output (without the batch axis). `placed` is a
        `ModelInput` when the request sent the model input itself (no image to map results back to)."""
        ...


@dataclass(frozen=True)
class ServiceTask:
    name: str  # the manifest's `task`
    path: str  # the task's route
    router: APIRouter
    transform: Callable[[Manifest], Transform]
    protocol: ProtocolOutputs
