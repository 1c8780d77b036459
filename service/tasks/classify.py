"""Classification, served: centre-crop transform, softmax top-k, `POST /classify`.

The transform follows the manifest's `preprocess` block exactly as the export
recorded it: bicubic resize (aspect kept) to cover `resize_to_cover`, centre crop,
/255, mean/std (for an export whose graph normalises, the crop's uint8 pixels as they are).
For a square crop that is the official evaluation transform (short side to 256/224 of
the crop). Results refer to the whole image, so there is no inverse to apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image
from pydantic import BaseModel, Field

from manifest import CropPreprocess, Manifest
from service import errors
from service.api import State, image_route, run_images
from service.schemas import ModelInfo
from service.tasks.base import Placed, ServiceTask, TensorMeta

if TYPE_CHECKING:
    from service.models import Model


@dataclass(frozen=True)
class Cropped:
    pixels: np.ndarray  # float32 [3, H, W], normalised; or uint8 [3, H, W] when the graph normalises


@dataclass(frozen=True)
class CenterCrop:
    resize_to_cover: tuple[int, int]  # (height, width)
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalise_in_graph: bool = False  # the model takes the uint8 pixels as they are

    @classmethod
    def from_manifest(cls, spec: CropPreprocess) -> CenterCrop:
        return cls(spec.resize_to_cover, spec.crop, spec.mean, spec.std, spec.normalise == "graph")

    @property
    def draft_short_side(self) -> int:
        """A short side that always covers the resize target."""
        return max(self.resize_to_cover)

    def to_canvas(self, image: Image.Image, full_size: tuple[int, int] | None = None) -> Cropped:
        """RGB image -> float32 [3, H, W], normalised, or its uint8 pixels when the graph normalises.
        (The full size does not matter: crops are relative.)"""
        width, height = image.size
        cover_h, cover_w = self.resize_to_cover
        if cover_w / width >= cover_h / height:  # width decides (torchvision's Resize: the long side truncated)
            size = (cover_w, int(height * cover_w / width))
        else:
            size = (int(width * cover_h / height), cover_h)
        crop_h, crop_w = self.crop
        if crop_w > size[0] or crop_h > size[1]:  # rounding left the resized image a pixel short
            size = (max(size[0], crop_w), max(size[1], crop_h))
        # Resize only the region the centre crop keeps (Pillow's `box`): the same pixels as
        # resizing the whole image and then cropping, without ever allocating the whole resized
        # image (a 1x40000 image would otherwise become 256x10,240,000).
        left, top = round((size[0] - crop_w) / 2), round((size[1] - crop_h) / 2)
        sx, sy = width / size[0], height / size[1]
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        image = image.resize((crop_w, crop_h), Image.Resampling.BICUBIC, box=box)
        if self.normalise_in_graph:
            return Cropped(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        array = (pixels - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return Cropped(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _transform(manifest: Manifest) -> CenterCrop:
    if not isinstance(manifest.preprocess, CropPreprocess):
        raise TypeError(f"a classifier needs a crop preprocess, not {manifest.preprocess.resize}")
    return CenterCrop.from_manifest(manifest.preprocess)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True))


def top_predictions(logits: np.ndarray, labels: list[str], top_k: int) -> list[dict[str, Any]]:
    """One image's logits -> its `top_k` classes by softmax probability (ties: the lower class id first)."""
    probs = softmax(logits.astype(np.float64))
    top = np.argsort(-probs, kind="stable")[:top_k]
    return [{"class_id": int(i), "label": labels[i], "score": float(probs[i])} for i in top]


class Prediction(BaseModel):
    class_id: int
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResult(BaseModel):
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    model: ModelInfo
    results: list[ClassifyResult] = Field(description="one result per image, in request order")


router = APIRouter()


@router.post("/classify", response_model=ClassifyResponse, **image_route("Classify one or more images"))
async def classify(
    request: Request,
    state: State,
    top_k: Annotated[int, Query(ge=1, description="predictions per image (1..num_classes)")] = 5,
) -> dict[str, Any]:
    with state.model_for_task("classify").lease() as model:
        if top_k > len(model.labels):
            raise errors.InvalidParameter(f"top_k: must be at most the number of classes ({len(model.labels)})")
        _, outputs = await run_images(request, state, model)
        results = [{"predictions": top_predictions(logits, model.labels, top_k)} for logits in outputs]
        return {"model": model.info(), "results": results}


class ClassifyOutputs:
    """Open Inference Protocol outputs: the logits and their softmax, [N, classes] each."""

    finish_blocks = False

    def outputs(self, manifest: Manifest) -> list[TensorMeta]:
        return [
            TensorMeta("logits", "FP32", [-1, manifest.num_classes]),
            TensorMeta("probabilities", "FP32", [-1, manifest.num_classes]),
        ]

    def parameters(self, model: Model, parameters: Mapping[str, Any]) -> None:
        return None

    def finish(self, model: Model, row: np.ndarray, placed: Placed, parameters: Any) -> dict[str, np.ndarray]:
        logits = np.asarray(row, dtype=np.float32)
        return {"logits": logits, "probabilities": softmax(logits.astype(np.float64)).astype(np.float32)}


TASK = ServiceTask(name="classify", path="/classify", router=router, transform=_transform, protocol=ClassifyOutputs())
