"""Image decoding, the same for every task (pure functions, no web framework).

Pillow, with the pixel count checked from the header before any pixel is
decoded (which also stops decompression bombs), JPEG draft mode so a large
photo is decoded at a reduced scale that still covers what the task's
transform needs, EXIF orientation applied, and every mode converted to RGB
(alpha composited on white, 16-bit scaled down, CMYK converted). What happens
next (crop, letterbox) is the task's transform (`service.tasks`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# The service enforces its own pixel limit before decoding; Pillow's own bomb
# check would otherwise raise a different error (or warn) first.
Image.MAX_IMAGE_PIXELS = None
ORIENTATION_TAG = 0x0112


class ImageError(Exception):
    """The bytes are not a decodable image."""


class ImageTooLarge(Exception):
    """The image has more pixels than allowed."""


def decode(data: bytes, max_pixels: int, draft_short_side: int | None = None) -> Image.Image:
    """Bytes -> RGB image, upright. `draft_short_side`: the smallest short side the caller needs."""
    return decode_with_size(data, max_pixels, draft_short_side)[0]


def decode_with_size(
    data: bytes, max_pixels: int, draft_short_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """`decode`, and the upright (width, height) of the full image: with JPEG draft decoding the
    image may be smaller than that, and box coordinates must refer to the full image."""
    if not data:
        raise ImageError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"the image has {width}x{height} pixels, more than the limit of {max_pixels}")
            if draft_short_side and image.format == "JPEG" and isinstance(image, ImageFile.ImageFile):
                # Decode at the smallest 1/2^k scale whose short side still covers the target.
                scale = min(width, height) / draft_short_side
                if scale >= 2:
                    image.draft("RGB", (int(width / scale) + 1, int(height / scale) + 1))
            image.load()
            turned = image.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)  # these swap width and height
            image = ImageOps.exif_transpose(image)
            return to_rgb(image), (height, width) if turned else (width, height)
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"the image could not be decoded ({exc})") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        gray = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
