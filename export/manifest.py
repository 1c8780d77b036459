"""The manifest: what makes an export folder self-describing for the service and its users."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from export.weights import sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Official evaluation transform: bicubic resize to 256/224 of the crop, centre crop.
RESIZE_RATIO = 256 / 224


def classification_preprocess(input_size: tuple[int, int]) -> dict[str, Any]:
    """The official evaluation transform, generalised to non-square inputs.

    The image is scaled, keeping its aspect ratio, to the smallest size that covers
    `resize_to_cover` (for a square crop: its short side becomes 256/224 of the crop,
    exactly the official `Resize(256)` for 224), then centre-cropped to `crop`.
    """
    h, w = input_size
    return {
        "resize_to_cover": [int(RESIZE_RATIO * h), int(RESIZE_RATIO * w)],
        "crop": [h, w],
        "interpolation": "bicubic",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input_range": "RGB scaled to [0, 1], then (x - mean) / std",
        "layout": "NCHW",
    }


def letterbox_preprocess(canvas: tuple[int, int]) -> dict[str, Any]:
    """mmdetection's test transform for a fixed canvas: resize keeping the aspect ratio to fit
    inside it, normalise, pad bottom/right with zeros (the mean colour after normalisation)."""
    h, w = canvas
    return {
        "resize": "letterbox",
        "canvas": [h, w],
        "scale": "min(canvas_h / image_h, canvas_w / image_w); resized side = int(side * scale + 0.5)",
        "pad": "bottom and right, value 0 after normalisation",
        "interpolation": "bilinear",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input_range": "RGB scaled to [0, 1], then (x - mean) / std",
        "layout": "NCHW",
    }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "focal-serve",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxscript",
        "onnxconverter-common",
        "tensorrt",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def code_fingerprint() -> str:
    """sha256 over the model and export source: a code change invalidates earlier exports."""
    import hashlib

    import focal

    digest = hashlib.sha256()
    for package in (Path(focal.__file__).parent, Path(__file__).parent):
        for path in sorted(package.rglob("*.py")):
            digest.update(path.relative_to(package.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a manifest
    return path


def artifacts_intact(folder: Path, manifest: dict[str, Any], names: list[str]) -> bool:
    """True when every named artifact exists and matches the sha256 the manifest recorded."""
    recorded = manifest.get("sha256", {})
    for name in names:
        path = folder / name
        if name not in recorded or not path.is_file() or sha256_file(path) != recorded[name]:
            return False
    return True
