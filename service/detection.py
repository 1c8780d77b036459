"""Detection post-processing in NumPy: score threshold, class-aware NMS, mapping boxes back to the image.

The exported graph gives, per image, rows of (x1, y1, x2, y2, score, class_id)
in canvas pixels: the top candidates of each pyramid level. What is left is
mmdetection's test procedure: clip the boxes to the resized image inside the
canvas (mmdetection's `img_shape`), drop scores at or below the threshold,
greedy NMS per class (a box is suppressed by a higher-scoring box of its class
with IoU above the threshold), keep the best `max_detections`; then undo the
letterbox scale.

Ties are broken by row order (a stable sort), so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DetectionSettings:
    """The export's test settings (manifest `detection.postprocess`)."""

    score_threshold: float
    iou_threshold: float
    max_detections: int

    @classmethod
    def from_manifest(cls, detection: dict[str, Any]) -> DetectionSettings:
        post = detection["postprocess"]
        return cls(float(post["score_threshold"]), float(post["iou_threshold"]), int(post["max_detections"]))


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
    settings: DetectionSettings,
    image_size: tuple[int, int],
    resized: tuple[int, int],
    scale: tuple[float, float],
    score_threshold: float | None = None,
    max_detections: int | None = None,
) -> list[tuple[float, float, float, float, float, int]]:
    """One image's [K, 6] candidates -> (x1, y1, x2, y2, score, class_id) in original pixels, best first.

    A request's `score_threshold` above the export's is applied before NMS, which
    keeps exactly the detections that NMS at the export's threshold would have
    kept with scores above it (a box is only ever suppressed by a higher score)."""
    threshold = max(settings.score_threshold, score_threshold or 0.0)
    limit = min(settings.max_detections, max_detections or settings.max_detections)
    candidates = rows[rows[:, 4] > threshold]
    boxes = np.clip(candidates[:, :4].astype(np.float64), 0, [resized[0], resized[1], resized[0], resized[1]])
    index = nms(boxes, candidates[:, 4], candidates[:, 5], settings.iou_threshold, limit)
    kept = candidates[index]
    width, height = image_size
    boxes = boxes[index] / np.asarray([scale[0], scale[1], scale[0], scale[1]])
    boxes = np.clip(boxes, 0, [width, height, width, height])  # rounding of the scale only
    return [
        (float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(row[4]), int(row[5]))
        for b, row in zip(boxes, kept, strict=True)
    ]
