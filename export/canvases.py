"""A detector's canvases: the input sizes its export holds a graph for (`--canvases`, `--canvas-set`).

mmdetection tests a detector at one `scale` (long, short): each image is resized keeping its aspect
ratio (`manifest.keep_ratio_size`) and padded to a multiple of 32, so the model sees a different
input size per aspect ratio. The window gathers of an export are static, so each size needs its own
graph. A canvas set is the pad-to-32 sizes of the common photo shapes at one scale, plus the two
canvases that hold any landscape or portrait image at that scale; an image whose pad-to-32 size is a
canvas is then fed exactly what mmdetection would feed the model.
"""

from __future__ import annotations

from manifest import keep_ratio_size

# Common photo shapes (width, height): square, 4:3 phone photos, 16:9 video and screens, 3:2 cameras.
PHOTO_SHAPES = {
    "1:1": (1080, 1080),
    "4:3": (4032, 3024),
    "3:4": (3024, 4032),
    "16:9": (1920, 1080),
    "9:16": (1080, 1920),
    "3:2": (6000, 4000),
    "2:3": (4000, 6000),
}
# name -> mmdetection test scale (long, short): the paper's setting, and the 640 one of real-time detectors.
CANVAS_SETS = {"paper": (1333, 800), "640": (640, 640)}
DEFAULT_CANVAS_SET = "640"
STRIDE = 32  # mmdetection pads to a multiple of this (the FPN's coarsest input stride)
WEIGHTS_DATA = "weights.data"  # the file the canvases' graphs keep their weights in (`export.shared_weights`)


def padded(size: int) -> int:
    return -(-size // STRIDE) * STRIDE


def mmdetection_input(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the tensor mmdetection feeds the model for an image: resized, padded to 32."""
    w, h = keep_ratio_size(width, height, scale)
    return padded(h), padded(w)


def canvas_set(scale: tuple[int, int]) -> list[tuple[int, int]]:
    """The canvases (height, width) of the common photo shapes at `scale`, plus the two that hold every
    landscape and every portrait image at it; largest first, each once."""
    long, short = scale
    sizes = {mmdetection_input(w, h, scale) for w, h in PHOTO_SHAPES.values()}
    sizes |= {(padded(short), padded(long)), (padded(long), padded(short))}
    return order(sizes)


def order(sizes: set[tuple[int, int]] | list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Largest area first (the first canvas is the manifest's own), then by height; duplicates dropped."""
    return sorted(set(sizes), key=lambda s: (-s[0] * s[1], -s[0], -s[1]))


def parse_canvases(text: str) -> list[tuple[int, int]]:
    """'480x640,640x480' (height x width, comma-separated) -> [(480, 640), (640, 480)]."""
    sizes = []
    for item in text.split(","):
        h, sep, w = item.strip().lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit():
            raise ValueError(f"{item.strip()!r} is not HxW (e.g. 480x640)")
        sizes.append((int(h), int(w)))
    return sizes


def parse_scale(text: str) -> tuple[int, int]:
    """'1333x800' (long x short) -> (1333, 800)."""
    long, sep, short = text.strip().lower().partition("x")
    if not sep or not long.isdigit() or not short.isdigit() or int(long) < int(short) or int(short) < 1:
        raise ValueError(f"{text!r} is not LONGxSHORT with LONG >= SHORT >= 1 (e.g. 1333x800)")
    return int(long), int(short)
