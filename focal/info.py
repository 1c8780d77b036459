"""Size and cost of a model: parameters, multiply-accumulates, per-stage geometry.

MACs are counted with the official `flops()` convention (the numbers in the
paper and the official README: Focal-T 4.92 G at 224): the neighbour ring is
counted as (w + 2e)^2 - w^2 = 120 keys (the implementation attends to 132, with
12 duplicates), windows as H*W / w^2 without padding, the stem and
downsampling convs as patch-size kernels also for `useconv`, and each
LayerNorm as one MAC per element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from focal.config import FocalConfig
from focal.model import FocalTransformer


@dataclass(frozen=True)
class ModelInfo:
    params: int
    macs: float
    stages: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "stages": self.stages}


def official_macs(model: FocalTransformer) -> float:
    cfg = model.config
    h0, w0 = model.resolutions[0]
    p = cfg.patch_size
    macs = float(h0 * w0 * cfg.embed_dim * cfg.in_chans * p * p)
    if cfg.patch_norm:
        macs += h0 * w0 * cfg.embed_dim
    for i, (dim, (h, w)) in enumerate(zip(cfg.stage_dims(), model.resolutions, strict=True)):
        heads = cfg.num_heads[i]
        head_dim = dim // heads
        for g in model.geometries[i]:
            n = g.window_area
            windows = h * w / g.window / g.window
            keys = n  # per window: q.k and attn.v each over these keys
            if g.pooled:
                keys += g.focal_window**2
            if g.expand > 0:
                keys += (g.window + 2 * g.expand) ** 2 - n
            per_window = n * dim * 3 * dim + 2 * heads * n * head_dim * keys + n * dim * dim
            macs += dim * h * w * 2  # norm1, norm2
            macs += windows * per_window
            if g.pooled:
                macs += windows * dim * n + windows * dim * 3 * dim  # pooling, qkv of pooled tokens
            macs += 2 * h * w * dim * dim * cfg.mlp_ratio
        if i < cfg.num_stages - 1:
            ho, wo = h // 2, w // 2
            macs += ho * wo * 2 * dim * dim * 4 + ho * wo * 2 * dim
    macs += cfg.num_features * h0 * w0 // (1 << cfg.num_stages)
    if not cfg.features_only:
        macs += cfg.num_features * cfg.num_classes
    return macs


def describe(config: FocalConfig) -> ModelInfo:
    model = FocalTransformer(config)
    stages = []
    for i, geoms in enumerate(model.geometries):
        g = geoms[0]
        stages.append(
            {
                "stage": i + 1,
                "resolution": [g.height, g.width],
                "dim": config.stage_dims()[i],
                "blocks": len(geoms),
                "window": g.window,
                "windows": [g.windows_h, g.windows_w],
                "keys_per_query": sorted({b.num_keys for b in geoms}),
                "neighbor_ring": g.expand > 0,
            }
        )
    params = sum(p.numel() for p in model.parameters())
    return ModelInfo(params=params, macs=official_macs(model), stages=stages)
