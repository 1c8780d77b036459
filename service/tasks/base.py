"""The interface every task's serving side implements (see `service.tasks`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from fastapi import APIRouter
from PIL import Image

from manifest import Manifest


class Placed(Protocol):
    """An image after the task's transform: the model input, and whatever the inverse needs."""

    @property
    def pixels(self) -> np.ndarray: ...  # float32 [3, H, W], normalised


class Transform(Protocol):
    """Image -> model input, built from the manifest's preprocess block."""

    @property
    def draft_short_side(self) -> int: ...  # a decoded short side this long is enough (JPEG draft decoding)

    def to_canvas(self, image: Image.Image, full_size: tuple[int, int]) -> Placed:
        """`image` (RGB, upright, possibly decoded at reduced scale) of full size `full_size` (width, height)."""
        ...


@dataclass(frozen=True)
class ServiceTask:
    name: str  # the manifest's `task`
    path: str  # the task's route
    router: APIRouter
    transform: Callable[[Manifest], Transform]
