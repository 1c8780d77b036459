"""Focal-RetinaNet: the Focal feature backbone + FPN + RetinaNet head, in mmdetection's layout.

Module names reproduce mmdetection 2.x's state-dict keys, so its checkpoints
load unchanged: `backbone.*` (the classification keys without the head, plus
`norm0`..`norm3`), `neck.lateral_convs.{i}.conv.*`, `neck.fpn_convs.{i}.conv.*`,
`bbox_head.{cls,reg}_convs.{i}.conv.*`, `bbox_head.retina_{cls,reg}.*`.

The model is built for one static canvas (H, W), multiples of 32. `forward`
returns, per image, the top `candidates_per_level` (anchor, class) pairs of
each of the five levels, decoded: [B, K, 6] rows of (x1, y1, x2, y2, score,
class_id) in canvas pixels, each level's rows sorted by score. Score
thresholding, class-aware NMS and the 100-detection cap run after it (in the
service), as mmdetection's test settings describe.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focal.anchors import MAX_LOG_RATIO, WH_RATIO_CLIP, AnchorSpec, level_sizes
from focal.checkpoint import (
    CheckpointAdaptationWarning,
    LoadReport,
    adapt_state_dict,
    check_fits,
    load_checkpoint,
    read_state_dict,
    unwrap_state_dict,
)
from focal.config import FocalConfig
from focal.model import FocalTransformer

BACKBONE_PREFIX = "backbone."


@dataclass(frozen=True)
class RetinaNetConfig:
    """mmdetection's RetinaNet defaults (neck, head, anchors and test settings)."""

    num_classes: int = 80
    fpn_channels: int = 256
    start_level: int = 1  # FPN inputs: backbone stages 2-4 (strides 8, 16, 32)
    num_outs: int = 5  # P3-P7; P6 from the last backbone map ('on_input'), P7 from P6
    stacked_convs: int = 4
    prior_prob: float = 0.01  # initial foreground probability of the class bias
    anchors: AnchorSpec = field(default_factory=AnchorSpec)
    candidates_per_level: int = 1000  # test cfg nms_pre
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    max_detections: int = 100

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConvModule(nn.Module):
    """A convolution, optionally followed by ReLU; named `conv` as in mmcv's ConvModule."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x


class FPN(nn.Module):
    """mmdetection FPN with `add_extra_convs='on_input'` and no ReLU before the extra convs."""

    def __init__(self, in_channels: list[int], out_channels: int, start_level: int, num_outs: int) -> None:
        super().__init__()
        used = in_channels[start_level:]
        if num_outs < len(used):
            raise ValueError(f"num_outs {num_outs} is less than the {len(used)} backbone levels used")
        self.start_level = start_level
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in used)
        extra = [in_channels[-1]] + [out_channels] * (num_outs - len(used) - 1)
        self.fpn_convs = nn.ModuleList(
            [ConvModule(out_channels, out_channels, 3) for _ in used]
            + [ConvModule(c, out_channels, 3, stride=2) for c in extra[: num_outs - len(used)]]
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        feats = inputs[self.start_level :]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + up
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=False)]
        extra_convs = list(self.fpn_convs)[len(laterals) :]
        for i, conv in enumerate(extra_convs):
            outs.append(conv(inputs[-1] if i == 0 else outs[-1]))
        return outs


class RetinaHead(nn.Module):
    """Shared across levels: 4 conv+ReLU per branch, then class logits [A*C] and box deltas [A*4]."""

    def __init__(self, num_classes: int, channels: int, stacked_convs: int, num_anchors: int, prior: float) -> None:
        super().__init__()
        self.num_classes, self.num_anchors = num_classes, num_anchors
        self.cls_convs = nn.ModuleList(ConvModule(channels, channels, 3, relu=True) for _ in range(stacked_convs))
        self.reg_convs = nn.ModuleList(ConvModule(channels, channels, 3, relu=True) for _ in range(stacked_convs))
        self.retina_cls = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior) / prior))  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One level [B, 256, H, W] -> logits [B, H*W*A, C] and deltas [B, H*W*A, 4], in anchor order."""
        cls, reg = x, x
        for conv in self.cls_convs:
            cls = conv(cls)
        for conv in self.reg_convs:
            reg = conv(reg)
        b = x.shape[0]
        logits = self.retina_cls(cls).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes)
        deltas = self.retina_reg(reg).permute(0, 2, 3, 1).reshape(b, -1, 4)
        return logits, deltas


class FocalRetinaNet(nn.Module):
    """Focal backbone (feature mode) + FPN + RetinaNet head, for a fixed canvas."""

    level_sizes: list[tuple[int, int]]  # P3..P7 feature-map sizes
    level_candidates: list[int]  # rows each level contributes to the output
    canvas_limit: Tensor  # (W, H), for clipping boxes

    def __init__(self, backbone: FocalConfig, config: RetinaNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or RetinaNetConfig()
        cfg = self.config
        canvas = backbone.img_size
        if canvas[0] % 32 or canvas[1] % 32:
            raise ValueError(f"the detection canvas {canvas[0]}x{canvas[1]} must have sides that are multiples of 32")
        if cfg.num_outs != len(cfg.anchors.strides):
            raise ValueError(f"{cfg.num_outs} FPN levels but {len(cfg.anchors.strides)} anchor strides")
        if not 0 < cfg.candidates_per_level < 3840:  # TensorRT's TopK limit
            raise ValueError("candidates_per_level must be in 1..3839")
        self.canvas = canvas
        self.backbone = FocalTransformer(backbone.replace(features_only=True))
        self.neck = FPN(backbone.stage_dims(), cfg.fpn_channels, cfg.start_level, cfg.num_outs)
        self.bbox_head = RetinaHead(
            cfg.num_classes, cfg.fpn_channels, cfg.stacked_convs, cfg.anchors.per_location, cfg.prior_prob
        )
        self.level_sizes = level_sizes(canvas, cfg.num_outs)
        self.level_candidates: list[int] = []
        for i, (size, stride) in enumerate(zip(self.level_sizes, cfg.anchors.strides, strict=True)):
            anchors = torch.from_numpy(cfg.anchors.level_anchors(size, stride))
            # Centres and sizes, so decoding is two gathers and no per-coordinate slicing.
            self.register_buffer(f"anchor_centers{i}", ((anchors[:, :2] + anchors[:, 2:]) * 0.5).float(), False)
            self.register_buffer(f"anchor_sizes{i}", (anchors[:, 2:] - anchors[:, :2]).float(), False)
            self.level_candidates.append(min(cfg.candidates_per_level, len(anchors) * cfg.num_classes))
        self.register_buffer("canvas_limit", torch.tensor([canvas[1], canvas[0]], dtype=torch.float32), False)

    @property
    def num_candidates(self) -> int:
        """Rows per image in the output: the sum of each level's candidates."""
        return sum(self.level_candidates)

    def describe(self) -> dict[str, Any]:
        """The manifest's `detection` block: everything needed to read the output and finish post-processing."""
        cfg = self.config
        return {
            "output_columns": ["x1", "y1", "x2", "y2", "score", "class_id"],
            "coordinates": "canvas pixels; the service maps them back to the original image",
            "canvas": list(self.canvas),
            "levels": [
                {"name": f"P{3 + i}", "stride": stride, "size": list(size), "candidates": k}
                for i, (size, stride, k) in enumerate(
                    zip(self.level_sizes, cfg.anchors.strides, self.level_candidates, strict=True)
                )
            ],
            "anchors": {
                "strides": list(cfg.anchors.strides),
                "octave_base_scale": cfg.anchors.octave_base_scale,
                "scales_per_octave": cfg.anchors.scales_per_octave,
                "ratios": list(cfg.anchors.ratios),
                "center_offset": cfg.anchors.center_offset,
                "per_location": cfg.anchors.per_location,
            },
            "box_coder": {
                "type": "DeltaXYWH",
                "means": [0.0] * 4,
                "stds": [1.0] * 4,
                "wh_ratio_clip": WH_RATIO_CLIP,
                "clip": "to the canvas in the graph, to the image in the service",
            },
            "selection": "per level, the top candidates over all (anchor, class) pairs by class logit; sigmoid scores",
            "postprocess": {
                "score_threshold": cfg.score_threshold,
                "nms": "class-aware, greedy",
                "iou_threshold": cfg.iou_threshold,
                "max_detections": cfg.max_detections,
            },
            "neck": {
                "type": "FPN",
                "channels": cfg.fpn_channels,
                "start_level": cfg.start_level,
                "num_outs": cfg.num_outs,
            },
            "head": {"type": "RetinaHead", "stacked_convs": cfg.stacked_convs, "num_classes": cfg.num_classes},
        }

    def forward_raw(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per level: class logits [B, H*W*A, C] and box deltas [B, H*W*A, 4]."""
        levels = self.neck(self.backbone.forward_pyramid(x))
        return [self.bbox_head(level) for level in levels]

    def select_and_decode(self, raw: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Per level: the top (anchor, class) pairs by logit, their sigmoid scores and decoded boxes."""
        rows = []
        classes = self.config.num_classes
        for i, (logits, deltas) in enumerate(raw):
            top, index = _top_k(logits.flatten(1), self.level_candidates[i])
            class_id = index % classes
            anchor = index // classes  # exported as integer Div (torch.div with a rounding mode goes through floats)
            delta = deltas.gather(1, anchor.unsqueeze(-1).expand(-1, -1, 4))
            centers, sizes = getattr(self, f"anchor_centers{i}")[anchor], getattr(self, f"anchor_sizes{i}")[anchor]
            boxes = decode_boxes(centers, sizes, delta, self.canvas_limit)
            rows.append(torch.cat([boxes, top.sigmoid().unsqueeze(-1), class_id.unsqueeze(-1).float()], dim=-1))
        return torch.cat(rows, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.select_and_decode(self.forward_raw(x))


def decode_boxes(centers: Tensor, sizes: Tensor, deltas: Tensor, limit: Tensor) -> Tensor:
    """DeltaXYWH (means 0, stds 1): anchor centres move by (dx, dy) * size, sizes scale by exp(dw, dh)
    clamped to |log(16/1000)|; boxes (x1, y1, x2, y2) are clipped to [0, limit (W, H)]."""
    new_ctr = centers + sizes * deltas[..., :2]
    new_size = sizes * torch.exp(deltas[..., 2:].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    low = torch.minimum(torch.clamp(new_ctr - 0.5 * new_size, min=0), limit)
    high = torch.minimum(torch.clamp(new_ctr + 0.5 * new_size, min=0), limit)
    return torch.cat([low, high], dim=-1)


def _top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Largest k along dim 1, sorted, ties to the lower index, as ONNX TopK specifies.

    Exported, this is a TopK node. In eager PyTorch, `topk` orders ties arbitrarily, so
    a stable sort stands in (slower, but the eager model is only the reference): a model
    whose scores tie exactly (constructed weights) must select the same rows in both."""
    if torch.compiler.is_exporting():
        return scores.topk(k, dim=1)
    values, index = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], index[:, :k]


def create_detector(variant: str, canvas: tuple[int, int] = (640, 640), **overrides: Any) -> FocalRetinaNet:
    """A randomly initialised Focal-RetinaNet for a named variant (eval mode)."""
    from focal.config import get_variant

    backbone = get_variant(variant).config(**{**overrides, "img_size": canvas, "features_only": True})
    return FocalRetinaNet(backbone).eval()


def load_detection_checkpoint(model: FocalRetinaNet, checkpoint: str | Path | Mapping[str, Any]) -> LoadReport:
    """Load an mmdetection checkpoint (`{'state_dict': ..., 'meta': ...}` or a bare state dict), strictly.

    The backbone part goes through the same adaptations as a classification
    checkpoint (official index buffers dropped, bias tables resized to this
    canvas); every other key must match exactly. Mismatches raise
    `CheckpointError` listing each missing, unexpected and misshapen key."""
    if isinstance(checkpoint, Mapping):
        source, raw = "state dict", unwrap_state_dict(checkpoint)
    else:
        source, raw = str(checkpoint), read_state_dict(checkpoint)
    backbone = {k[len(BACKBONE_PREFIX) :]: v for k, v in raw.items() if k.startswith(BACKBONE_PREFIX)}
    rest = {k: v for k, v in raw.items() if not k.startswith(BACKBONE_PREFIX)}
    notes: list[str] = []
    dropped = 0
    if backbone:
        adapted, notes, dropped = adapt_state_dict(backbone, model.backbone)
        rest.update({BACKBONE_PREFIX + k: v for k, v in adapted.items()})
        notes = [BACKBONE_PREFIX + note for note in notes]
    check_fits(model, rest, source)
    for note in notes:
        warnings.warn(f"{source}: {note}", CheckpointAdaptationWarning, stacklevel=2)
    model.load_state_dict(rest, strict=True)
    return LoadReport(source=source, adaptations=notes, ignored_buffers=dropped)


def load_backbone_weights(model: FocalRetinaNet, checkpoint: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Initialise the backbone from an ImageNet classification checkpoint (head dropped, resized as needed)."""
    return load_checkpoint(model.backbone, checkpoint)


def is_detection_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """mmdetection layout: keys under backbone./neck./bbox_head."""
    return any(k.startswith(("neck.", "bbox_head.")) for k in state_dict)
