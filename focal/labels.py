"""Class names shipped with the package."""

from __future__ import annotations

from functools import cache
from importlib import resources

IMAGENET1K_LABELS_FILE = "imagenet1k_labels.txt"
COCO_LABELS_FILE = "coco_labels.txt"


def _read_labels(file: str, expected: int) -> tuple[str, ...]:
    text = resources.files("focal").joinpath("data", file).read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != expected:
        raise RuntimeError(f"{file} has {len(labels)} names, expected {expected}")
    return labels


@cache
def imagenet1k_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names, in class-index order."""
    return _read_labels(IMAGENET1K_LABELS_FILE, 1000)


@cache
def coco_labels() -> tuple[str, ...]:
    """The 80 COCO detection class names, in the contiguous index order mmdetection uses."""
    return _read_labels(COCO_LABELS_FILE, 80)
