"""RetinaNet anchors and box deltas, as mmdetection 2.x defines them (pure NumPy, computed at build time).

Anchor layout, per level: for every feature-map cell in row-major order (y outer,
x inner), the 9 anchors of that cell, ratio-major (ratios 0.5, 1, 2, each at the
3 octave scales). A cell's anchors are centred on its top-left corner
(`center_offset` 0, mmdetection's default): cell (i, j) of a level with stride
s is centred at (j * s, i * s). This is the order in which the head's
convolution channels (anchor-major, then class or coordinate) are flattened.

Box deltas are DeltaXYWH with means 0 and stds 1 (`focal.detection.decode_boxes`):
a box is its anchor's centre moved by (dx * w, dy * h) and its size scaled by
(exp(dw), exp(dh)), with dw, dh clamped to |log(16/1000)| as mmdetection does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AnchorSpec:
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    octave_base_scale: int = 4
    scales_per_octave: int = 3
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    center_offset: float = 0.0

    @property
    def per_location(self) -> int:
        return len(self.ratios) * self.scales_per_octave

    def base_anchors(self, stride: int) -> np.ndarray:
        """[A, 4] boxes (x1, y1, x2, y2) around the origin of one cell, ratio-major."""
        scales = self.octave_base_scale * 2.0 ** (np.arange(self.scales_per_octave) / self.scales_per_octave)
        h_ratios = np.sqrt(np.asarray(self.ratios, dtype=np.float64))
        w_ratios = 1.0 / h_ratios
        ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        c = self.center_offset * stride
        return np.stack([c - 0.5 * ws, c - 0.5 * hs, c + 0.5 * ws, c + 0.5 * hs], axis=1)

    def level_anchors(self, size: tuple[int, int], stride: int) -> np.ndarray:
        """[H * W * A, 4] anchors of one level with a `size` = (H, W) feature map, in the head's order."""
        h, w = size
        ys, xs = np.meshgrid(np.arange(h) * stride, np.arange(w) * stride, indexing="ij")
        shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4).astype(np.float64)
        anchors: np.ndarray = (shifts + self.base_anchors(stride)[None]).reshape(-1, 4)
        return anchors


def level_sizes(canvas: tuple[int, int], num_levels: int = 5) -> list[tuple[int, int]]:
    """Feature-map sizes of P3..P7 for a canvas whose sides are multiples of 32.

    P3-P5 are the backbone's stride 8/16/32 maps; P6 and P7 come from 3x3
    stride-2 convolutions with padding 1, i.e. ceil(n / 2)."""
    h, w = canvas[0] // 8, canvas[1] // 8
    sizes = []
    for level in range(num_levels):
        sizes.append((h, w))
        h, w = (h // 2, w // 2) if level < 2 else ((h + 1) // 2, (w + 1) // 2)
    return sizes


# mmdetection's DeltaXYWHBBoxCoder default: log-size deltas are clamped to |log(16 / 1000)|.
WH_RATIO_CLIP = 16 / 1000
MAX_LOG_RATIO = abs(math.log(WH_RATIO_CLIP))
