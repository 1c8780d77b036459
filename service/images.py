"""Image decoding and preprocessing for classification and detection (pure functions, no web framework).

Decoding: Pillow, with the pixel count checked from the header before any
pixel is decoded (which also stops decompression bombs), JPEG draft mode so a
large photo is decoded at a reduced scale that still covers the resize target,
EXIF orientation applied, and every mode converted to RGB (alpha composited on
white, 16-bit scaled down, CMYK converted).

Preprocessing follows the manifest's `preprocess` block exactly as the export
recorded it: bicubic resize (aspect kept) to cover `resize_to_cover`, centre
crop, /255, mean/std. For a square crop that is the official evaluation
transform: short side to 256/224 of the crop.

Detection exports record a `letterbox` block instead: the image is scaled,
keeping its aspect ratio, to fit inside the static canvas (mmdetection's
rounding and its OpenCV bilinear resize), normalised, and padded bottom/right
with zeros; `Letterboxed` carries the per-axis scale that maps canvas boxes
back to the image.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Preprocess:
    resize_to_cover: tuple[int, int]  # (height, width)
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def draft_short_side(self) -> int:
        """A short side that always covers the resize target (for JPEG draft decoding)."""
        return max(self.resize_to_cover)

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> Preprocess:
        if spec.get("interpolation", "bicubic") != "bicubic":
            raise ValueError(f"unsupported interpolation {spec.get('interpolation')!r}")
        mean, std = spec["mean"], spec["std"]
        return cls(
            resize_to_cover=(int(spec["resize_to_cover"][0]), int(spec["resize_to_cover"][1])),
            crop=(int(spec["crop"][0]), int(spec["crop"][1])),
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
        )


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


def preprocess(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB image -> float32 [3, H, W], normalised as the export recorded."""
    width, height = image.size
    cover_h, cover_w = spec.resize_to_cover
    if cover_w / width >= cover_h / height:  # width decides (torchvision's Resize: the long side truncated)
        size = (cover_w, int(height * cover_w / width))
    else:
        size = (int(width * cover_h / height), cover_h)
    crop_h, crop_w = spec.crop
    if crop_w > size[0] or crop_h > size[1]:  # rounding left the resized image a pixel short
        size = (max(size[0], crop_w), max(size[1], crop_h))
    # Resize only the region the centre crop keeps (Pillow's `box`): the same pixels as
    # resizing the whole image and then cropping, without ever allocating the whole resized
    # image (a 1x40000 image would otherwise become 256x10,240,000).
    left, top = round((size[0] - crop_w) / 2), round((size[1] - crop_h) / 2)
    sx, sy = width / size[0], height / size[1]
    box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
    image = image.resize((crop_w, crop_h), Image.Resampling.BICUBIC, box=box)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    array = (pixels - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


@dataclass(frozen=True)
class Letterbox:
    canvas: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def draft_short_side(self) -> int:
        """JPEG draft target: a short side this long always covers the resized image."""
        return min(self.canvas)

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> Letterbox:
        if spec.get("interpolation") != "bilinear":
            raise ValueError(f"unsupported interpolation {spec.get('interpolation')!r} for a letterbox")
        mean, std = spec["mean"], spec["std"]
        return cls(
            canvas=(int(spec["canvas"][0]), int(spec["canvas"][1])),
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
        )


@dataclass(frozen=True)
class Letterboxed:
    pixels: np.ndarray  # float32 [3, H, W] canvas
    image_size: tuple[int, int]  # original (width, height)
    resized: tuple[int, int]  # (width, height) of the image inside the canvas
    scale: tuple[float, float]  # (resized width / width, resized height / height)


def preprocess_spec(spec: dict[str, Any]) -> Preprocess | Letterbox:
    """The manifest's `preprocess` block as a spec object (`Letterbox` for detection exports)."""
    return Letterbox.from_manifest(spec) if spec.get("resize") == "letterbox" else Preprocess.from_manifest(spec)


def letterbox_size(width: int, height: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """(width, height) the image is resized to: aspect kept, fitting the canvas, rounded as mmdetection does."""
    scale = min(canvas[0] / height, canvas[1] / width)
    return (
        min(max(int(width * scale + 0.5), 1), canvas[1]),
        min(max(int(height * scale + 0.5), 1), canvas[0]),
    )


def letterbox(image: Image.Image, spec: Letterbox, full_size: tuple[int, int] | None = None) -> Letterboxed:
    """RGB image -> the normalised canvas with the image at the top left, and the scale back.

    `full_size`: the image's real (width, height) when `image` was decoded at a reduced
    (JPEG draft) scale; sizes and scales refer to it, as if the full image had been resized."""
    width, height = full_size or image.size
    new_w, new_h = letterbox_size(width, height, spec.canvas)
    resized = resize_linear(np.asarray(image), (new_w, new_h))
    pixels = resized.astype(np.float32) / np.float32(255.0)
    normalised = (pixels - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    canvas = np.zeros((3, *spec.canvas), dtype=np.float32)
    canvas[:, :new_h, :new_w] = normalised.transpose(2, 0, 1)
    return Letterboxed(canvas, (width, height), (new_w, new_h), (new_w / width, new_h / height))


def _linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index along one axis: the two source indices and the weight of the second."""
    position = (np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5
    first = np.floor(position).astype(np.int64)
    weight = position - first
    outside = (first < 0) | (first >= source - 1)  # at the edges the nearest pixel is repeated
    first = np.clip(first, 0, source - 1)
    weight[outside] = 0.0
    return first, np.minimum(first + 1, source - 1), weight.astype(np.float32)


def resize_linear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C] = `size` (width, height), as OpenCV's INTER_LINEAR.

    That is what mmdetection resizes with: pixel centres at +0.5, edges clamped, and no
    smoothing when shrinking (Pillow's bilinear averages over the shrink factor, so a
    detector trained with mmdetection would see other pixel values). Agrees with
    OpenCV to within one level (OpenCV uses 11-bit fixed-point weights)."""
    if (pixels.shape[1], pixels.shape[0]) == tuple(size):
        return pixels
    y0, y1, wy = _linear_taps(pixels.shape[0], size[1])
    x0, x1, wx = _linear_taps(pixels.shape[1], size[0])
    # The four neighbours of each output pixel, picked as uint8: memory follows the output size only.
    rows0, rows1 = y0[:, None], y1[:, None]
    a, b = pixels[rows0, x0].astype(np.float32), pixels[rows0, x1].astype(np.float32)
    c, d = pixels[rows1, x0].astype(np.float32), pixels[rows1, x1].astype(np.float32)
    weight_x = wx[None, :, None]
    top, bottom = a + (b - a) * weight_x, c + (d - c) * weight_x  # horizontal first, as OpenCV
    out = top + (bottom - top) * wy[:, None, None]
    result: np.ndarray = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return result
