"""Class names shipped with the package."""

from __future__ import annotations

from functools import cache
from importlib import resources

IMAGENET1K_LABELS_FILE = "imagenet1k_labels.txt"


@cache
def imagenet1k_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names, in class-index order."""
    text = resources.files("focal").joinpath("data", IMAGENET1K_LABELS_FILE).read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) != 1000:
        raise RuntimeError(f"{IMAGENET1K_LABELS_FILE} has {len(labels)} names, expected 1000")
    return labels
