"""Test images made on the fly (every format and mode the service must accept)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """A smooth colour image with some structure (gradients + noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_rotated_jpeg(image: Image.Image) -> bytes:
    """The image stored rotated, with EXIF orientation 6 saying how to show it upright (as phones do)."""
    stored = image.transpose(Image.Transpose.ROTATE_90)  # a viewer applies ROTATE_270 for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())
