"""Detection, served: the letterbox transform and its inverse, class-aware NMS, `POST /detect`.

The export's graph gives, per image, rows of (x1, y1, x2, y2, score, class_id) in
canvas pixels: the top candidates of each pyramid level (`manifest.Detection`).
What is left is mmdetection's test procedure, here:

- `Letterbox.to_canvas`: the image is resized keeping its aspect ratio, as mmdetection
  does at the export's test scale (its rounding, and OpenCV's bilinear resize bit for bit),
  routed to the smallest of the export's canvases that holds it, normalised, and padded
  bottom/right with zeros (the mean colour).
- `postprocess`: boxes clipped to the resized image inside the canvas (mmdetection's
  `img_shape`), scores at or below the threshold dropped, boxes left with no width or
  height by the clipping dropped (they lie in the padding), greedy NMS per class (a box
  is suppressed by a higher-scoring box of its class with IoU above the threshold),
  the best `max_detections` kept.
- `Letterbox.to_image`: canvas boxes back to the original image's pixels, per axis.

Ties are broken by row order (a stable sort), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image
from pydantic import BaseModel, Field

from manifest import DetectionPostprocess, DetectManifest, Manifest, keep_ratio_size
from service import errors
from service.api import State, image_route, run_images
from service.inference import off_loop
from service.schemas import ModelInfo
from service.tasks.base import Placed, ServiceTask, TensorMeta

if TYPE_CHECKING:
    from service.models import Model

Box = tuple[float, float, float, float, float, int]  # x1, y1, x2, y2, score, class_id
DEFAULT_SCORE_THRESHOLD = 0.3  # what a request that names none keeps (the export's own floor is lower)


@dataclass(frozen=True)
class Letterboxed:
    pixels: np.ndarray  # float32 [3, H, W]: the canvas the image was routed to
    image_size: tuple[int, int]  # original (width, height)
    resized: tuple[int, int]  # (width, height) of the image inside the canvas
    scale: tuple[float, float]  # (resized width / width, resized height / height)


@dataclass(frozen=True)
class Letterbox:
    """mmdetection's test transform onto the export's canvases (`manifest.LetterboxPreprocess`)."""

    canvases: tuple[tuple[int, int], ...]  # (height, width) each
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    test_scale: tuple[int, int]  # (long, short) of the keep-ratio resize (`DetectManifest.test_scale`)

    @classmethod
    def from_manifest(cls, manifest: DetectManifest) -> Letterbox:
        spec = manifest.preprocess
        return cls(tuple(manifest.canvas_sizes), spec.mean, spec.std, manifest.test_scale)

    @property
    def draft_short_side(self) -> int:
        """JPEG draft target: a short side this long always covers the resized image."""
        return max(min(c) for c in self.canvases)

    def route(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(canvas (height, width), resized (width, height)) for an image.

        The image is resized as mmdetection would (`keep_ratio_size` at the test scale) and goes to the
        smallest canvas that holds it: its pad-to-32 size, mmdetection's own input, whenever that is a
        canvas. When none holds it, it is fitted (aspect kept, smaller than mmdetection would make it)
        into the canvas where it comes out largest, the smallest of those on a tie."""
        w, h = keep_ratio_size(width, height, self.test_scale)
        holding = [c for c in self.canvases if h <= c[0] and w <= c[1]]
        if holding:
            return min(holding, key=lambda c: (c[0] * c[1], c)), (w, h)
        fits = [(self.fit(c, width, height), c) for c in self.canvases]
        (w, h), canvas = max(fits, key=lambda f: (f[0][0] * f[0][1], -f[1][0] * f[1][1]))
        return canvas, (w, h)

    @staticmethod
    def fit(canvas: tuple[int, int], width: int, height: int) -> tuple[int, int]:
        """(width, height) an image is resized to: aspect kept, inside the canvas, rounded as mmdetection does."""
        scale = min(canvas[0] / height, canvas[1] / width)
        return (
            min(max(int(width * scale + 0.5), 1), canvas[1]),
            min(max(int(height * scale + 0.5), 1), canvas[0]),
        )

    def to_canvas(self, image: Image.Image, full_size: tuple[int, int] | None = None) -> Letterboxed:
        """RGB image -> its normalised canvas with the image at the top left, and the scale back.

        `full_size`: the image's real (width, height) when `image` was decoded at a reduced
        (JPEG draft) scale; sizes and scales refer to it, as if the full image had been resized."""
        width, height = full_size or image.size
        canvas_size, (new_w, new_h) = self.route(width, height)
        resized = resize_linear(np.asarray(image), (new_w, new_h))
        pixels = resized.astype(np.float32) / np.float32(255.0)
        normalised = (pixels - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        canvas = np.zeros((3, *canvas_size), dtype=np.float32)
        canvas[:, :new_h, :new_w] = normalised.transpose(2, 0, 1)
        return Letterboxed(canvas, (width, height), (new_w, new_h), (new_w / width, new_h / height))

    @staticmethod
    def to_image(boxes: np.ndarray, placed: Letterboxed) -> np.ndarray:
        """[N, 4] canvas boxes (x1, y1, x2, y2) -> the original image's pixels, clipped to it."""
        sx, sy = placed.scale
        width, height = placed.image_size
        back = boxes / np.asarray([sx, sy, sx, sy])
        clipped: np.ndarray = np.clip(back, 0, [width, height, width, height])  # the scale's rounding only
        return clipped


def _linear_taps(source: int, target: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output index along one axis, as OpenCV computes them: the two source indices and their
    weights in 11-bit fixed point (summing to 2048). Positions are float32 from a double scale; `clamp`
    (the horizontal axis) repeats the edge pixel with weight 2048 outside the image, while the vertical
    axis keeps the fraction and clamps only the row indices."""
    scale = 1.0 / (target / source)
    position = ((np.arange(target, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = (position - first.astype(np.float32)).astype(np.float32)
    if clamp:
        outside = (first < 0) | (first >= source - 1)
        fraction[outside] = 0
        first = np.where(first < 0, 0, np.minimum(first, source - 1))
    second_weight = np.rint(fraction * np.float32(_ONE)).astype(np.int32)
    first_weight = np.rint((np.float32(1) - fraction) * np.float32(_ONE)).astype(np.int32)
    return np.clip(first, 0, source - 1), np.clip(first + 1, 0, source - 1), first_weight, second_weight


_ONE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE


def resize_linear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C] = `size` (width, height), bit-exact with OpenCV's
    `cv2.resize(..., interpolation=cv2.INTER_LINEAR)`, which mmdetection resizes with.

    Pixel centres at +0.5, edges repeated, no smoothing when shrinking (Pillow's bilinear averages
    over the shrink factor, so a detector trained with mmdetection would see other pixel values), and
    OpenCV's fixed-point arithmetic: a horizontal pass with 11-bit weights, then a vertical one on the
    values shifted right by 4, each product's high 16 bits, and a rounding shift by 2."""
    if (pixels.shape[1], pixels.shape[0]) == tuple(size):
        return pixels
    y0, y1, wy0, wy1 = _linear_taps(pixels.shape[0], size[1], clamp=False)
    x0, x1, wx0, wx1 = _linear_taps(pixels.shape[1], size[0], clamp=True)

    def horizontal(rows: np.ndarray) -> np.ndarray:  # only the rows the output needs: memory follows its size
        picked = pixels[rows]
        weighted: np.ndarray = (
            picked[:, x0].astype(np.int32) * wx0[:, None] + picked[:, x1].astype(np.int32) * wx1[:, None]
        )
        return weighted >> 4

    out = ((horizontal(y0) * wy0[:, None, None]) >> 16) + ((horizontal(y1) * wy1[:, None, None]) >> 16)
    result: np.ndarray = np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)
    return result


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box [4] with boxes [N, 4] (x1, y1, x2, y2); 0 where the union is empty."""
    wh = np.clip(np.minimum(box[2:], boxes[:, 2:]) - np.maximum(box[:2], boxes[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, max_detections: int
) -> np.ndarray:
    """Class-aware greedy NMS; returns the kept row indices, best first, at most `max_detections`.

    Rows are visited in score order; each kept row suppresses the later rows of
    its class that overlap it by more than `iou_threshold`. Only kept rows get an
    IoU pass, and only against their own class, so the cost is about
    O(kept * rows per class)."""
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order].astype(np.float64)
    classes = np.unique(classes[order], return_inverse=True)[1].reshape(-1)  # 0..k-1 codes (NaN included)
    # Positions (in score order) of each class's rows, ascending.
    by_class = np.argsort(classes, kind="stable")
    starts = np.flatnonzero(np.r_[True, classes[by_class][1:] != classes[by_class][:-1]])
    members = dict(zip(classes[by_class][starts].tolist(), np.split(by_class, starts[1:]), strict=True))
    alive = np.ones(len(order), dtype=bool)
    keep: list[int] = []
    for i in range(len(order)):
        if len(keep) >= max_detections:
            break
        if not alive[i]:
            continue
        keep.append(i)
        same = members[classes[i].item()]
        later = same[np.searchsorted(same, i, side="right") :]
        alive[later[box_iou(boxes[i], boxes[later]) > iou_threshold]] = False
    return np.asarray(order[keep], dtype=np.int64)


def postprocess(
    rows: np.ndarray,
    placed: Letterboxed,
    settings: DetectionPostprocess,
    score_threshold: float | None = None,
    max_detections: int | None = None,
) -> list[Box]:
    """One image's [K, 6] candidates -> (x1, y1, x2, y2, score, class_id) in original pixels, best first.

    A request's `score_threshold` above the export's is applied before NMS, which
    keeps exactly the detections that NMS at the export's threshold would have
    kept with scores above it (a box is only ever suppressed by a higher score)."""
    threshold = max(settings.score_threshold, score_threshold or 0.0)
    limit = min(settings.max_detections, max_detections or settings.max_detections)
    candidates = rows[rows[:, 4] > threshold]
    width, height = placed.resized
    boxes = np.clip(candidates[:, :4].astype(np.float64), 0, [width, height, width, height])
    # A candidate lying wholly in the padding is flat once clipped: it overlaps nothing, so NMS would
    # never remove it and it would crowd real detections out. mmdetection drops these too (min_bbox_size 0).
    solid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    candidates, boxes = candidates[solid], boxes[solid]
    index = nms(boxes, candidates[:, 4], candidates[:, 5], settings.iou_threshold, limit)
    kept = candidates[index]
    image_boxes = Letterbox.to_image(boxes[index], placed)
    return [
        (float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(row[4]), int(row[5]))
        for b, row in zip(image_boxes, kept, strict=True)
    ]


def _transform(manifest: Manifest) -> Letterbox:
    if not isinstance(manifest, DetectManifest):
        raise TypeError(f"a detector needs a letterbox preprocess, not {manifest.preprocess.resize}")
    return Letterbox.from_manifest(manifest)


class Detection(BaseModel):
    class_id: int
    label: str
    score: float = Field(description="sigmoid class probability")
    box: list[float] = Field(description="[x1, y1, x2, y2] in the original image's pixels (after EXIF rotation)")


class DetectResult(BaseModel):
    detections: list[Detection] = Field(description="best first, after class-aware NMS")
    image_size: list[int] = Field(description="[width, height] of the image the boxes refer to")
    canvas: list[int] = Field(description="[height, width] of the canvas the image was resized onto and run at")
    resized: list[int] = Field(description="[width, height] of the image inside the canvas (the rest is padding)")


class DetectResponse(BaseModel):
    model: ModelInfo
    results: list[DetectResult] = Field(description="one result per image, in request order")


router = APIRouter()


@router.post(
    "/detect", response_model=DetectResponse, **image_route("Detect objects in one or more images (needs a detector)")
)
async def detect(
    request: Request,
    state: State,
    score_threshold: Annotated[
        float, Query(ge=0.0, le=1.0, description="keep detections scoring above this (the export's 0.05 at least)")
    ] = DEFAULT_SCORE_THRESHOLD,
    max_detections: Annotated[
        int | None, Query(ge=1, description="detections per image (default and most: the export's, 100)")
    ] = None,
) -> dict[str, Any]:
    with state.model_for_task("detect").lease() as model:
        assert model.manifest.task == "detect"  # the registry routes by task
        settings = model.manifest.detection.postprocess
        if max_detections is not None and max_detections > settings.max_detections:
            raise errors.InvalidParameter(f"max_detections: must be at most {settings.max_detections}")
        placed, outputs = await run_images(request, state, model)

        def finish(item: tuple[np.ndarray, Any]) -> dict[str, Any]:
            rows, image = item
            found = postprocess(rows, image, settings, score_threshold, max_detections)
            return {
                "detections": [
                    {"class_id": c, "label": model.labels[c], "score": score, "box": [x1, y1, x2, y2]}
                    for x1, y1, x2, y2, score, c in found
                ],
                "image_size": list(image.image_size),
                "canvas": list(image.pixels.shape[1:]),
                "resized": list(image.resized),
            }

        results = await off_loop(state, finish, list(zip(outputs, placed, strict=True)))
        return {"model": model.info(), "results": results}


@dataclass(frozen=True)
class _Limits:
    score_threshold: float
    max_detections: int


class DetectOutputs:
    """Open Inference Protocol outputs: `detections` FP32 [N, max_detections, 6], rows of (x1, y1, x2,
    y2, score, class_id) after NMS, best first, zero rows after the first `num_detections` INT32 [N].

    Boxes are in the original image's pixels for an image sent as bytes, in canvas pixels for a
    canvas sent as the model input. Request parameters `score_threshold` (default 0.3) and
    `max_detections` (default and most: the export's) mean what they mean for `/detect`."""

    finish_blocks = True  # NMS

    def outputs(self, manifest: Manifest) -> list[TensorMeta]:
        assert manifest.task == "detect"
        rows = manifest.detection.postprocess.max_detections
        return [TensorMeta("detections", "FP32", [-1, rows, 6]), TensorMeta("num_detections", "INT32", [-1])]

    def parameters(self, model: Model, parameters: Mapping[str, Any]) -> _Limits:
        assert model.manifest.task == "detect"
        most = model.manifest.detection.postprocess.max_detections
        threshold = parameters.get("score_threshold", DEFAULT_SCORE_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise errors.InvalidParameter("score_threshold: must be a number from 0 to 1")
        limit = parameters.get("max_detections", most)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= most:
            raise errors.InvalidParameter(f"max_detections: must be an integer from 1 to {most}")
        return _Limits(float(threshold), limit)

    def finish(self, model: Model, row: np.ndarray, placed: Placed, parameters: Any) -> dict[str, np.ndarray]:
        assert model.manifest.task == "detect"
        assert isinstance(parameters, _Limits)
        settings = model.manifest.detection.postprocess
        if not isinstance(placed, Letterboxed):  # a canvas sent as the model input: boxes stay in its pixels
            height, width = placed.pixels.shape[-2:]
            placed = Letterboxed(np.empty(0, np.float32), (width, height), (width, height), (1.0, 1.0))
        found = postprocess(row, placed, settings, parameters.score_threshold, parameters.max_detections)
        detections = np.zeros((settings.max_detections, 6), dtype=np.float32)
        if found:
            detections[: len(found)] = np.asarray(found, dtype=np.float64)
        return {"detections": detections, "num_detections": np.asarray(len(found), dtype=np.int32)}


TASK = ServiceTask(name="detect", path="/detect", router=router, transform=_transform, protocol=DetectOutputs())
