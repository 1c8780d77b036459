"""Size and cost of a model: parameters, multiply-accumulates, per-stage geometry.

MACs are counted with the official `flops()` convention of each family (the
numbers in the paper and the official README: Focal-T 4.92 G at 224): the
neighbour ring is counted as (w + 2e)^2 - w^2 = 120 keys (the implementation
attends to 132, with 12 duplicates), windows as H*W / w^2 without padding, the
stem and downsampling convs with their kernels (patch-size kernels, or 7x7 and
3x3 for `useconv`: Focal-T-useconv 5.17 G, the official README's 5.2 G), and each
LayerNorm as one MAC per element.

Focal-fast follows its own file's `flops()` (`focal_transformer_v2.py`): per level,
q.k and attn.v over its K keys plus the coordinate MLP, counted per query token for
the fine level and once per window for the pooled one. That
gives 5.32 G for Focal-fast-T at 224, not the 5.0 G of the official README's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from focal.config import FocalConfig
from focal.geometry import BlockGeometry
from focal.model import FocalTransformer
from focal.topk import TopKGeometry


@dataclass(frozen=True)
class ModelInfo:
    params: int
    macs: float
    stages: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "stages": self.stages}


def official_macs(model: FocalTransformer) -> float:
    cfg = model.config
    attention = _v2_attention_macs if cfg.family == "focal_fast" else _v1_attention_macs
    macs = _stem_macs(model)
    for i, (dim, (h, w)) in enumerate(zip(cfg.stage_dims(), model.resolutions, strict=True)):
        for g in model.geometries[i]:
            n = g.window_area
            windows = h * w / g.window / g.window
            macs += dim * h * w * 2  # norm1, norm2
            macs += windows * attention(g, dim, cfg.num_heads[i], cfg.focal_levels[i])
            if g.pooled:
                macs += windows * dim * n + windows * dim * 3 * dim  # pooling, qkv of pooled tokens
            macs += 2 * h * w * dim * dim * cfg.mlp_ratio
        macs += _downsample_macs(model, i)
    return macs + _head_macs(model)


def _v1_attention_macs(g: BlockGeometry, dim: int, heads: int, focal_level: int) -> float:
    """One window's qkv, q.k, attn.v and projection, as the official v1 flops() counts them."""
    n = g.window_area
    keys = n  # per window: q.k and attn.v each over these keys
    if g.pooled:
        keys += g.focal_window**2
    if g.expand > 0:
        keys += (g.window + 2 * g.expand) ** 2 - n
    return n * dim * 3 * dim + 2 * heads * n * (dim // heads) * keys + n * dim * dim


def _v2_attention_macs(g: BlockGeometry, dim: int, heads: int, focal_level: int) -> float:
    """The same for Focal-fast (its own flops()): per level, q.k and attn.v over its K keys and the coordinate
    MLP, whose count runs over focal_level levels even where a stage has no pooled tokens."""
    assert isinstance(g, TopKGeometry)
    n, head_dim = g.window_area, dim // heads
    keys = [min(g.top_k, g.height * g.width), min(g.top_k, g.num_windows)][:focal_level]
    macs = n * dim * 3 * dim + n * dim * dim
    for level, k in enumerate(keys):
        queries = n if level == 0 else 1  # official: N // window_size_glo**2, one pooled query
        macs += 2 * heads * n * head_dim * k + queries * k * (2 * head_dim + head_dim * heads)
    return macs


def _stem_macs(model: FocalTransformer) -> float:
    cfg = model.config
    h0, w0 = model.resolutions[0]
    kernel = 7 if cfg.use_conv_embed else cfg.patch_size
    return float(
        h0 * w0 * cfg.embed_dim * cfg.in_chans * kernel**2 + (h0 * w0 * cfg.embed_dim if cfg.patch_norm else 0)
    )


def _downsample_macs(model: FocalTransformer, stage: int) -> float:
    """The conv and LayerNorm after `stage` (none after the last)."""
    cfg = model.config
    if stage == cfg.num_stages - 1:
        return 0.0
    dim, (h, w) = cfg.stage_dims()[stage], model.resolutions[stage]
    kernel = 3 if cfg.use_conv_embed else 2
    ho, wo = h // 2, w // 2
    return float(ho * wo * 2 * dim * dim * kernel**2 + ho * wo * 2 * dim)


def _head_macs(model: FocalTransformer) -> float:
    """The final average pool (as the official code counts it) and the classifier."""
    cfg = model.config
    h0, w0 = model.resolutions[0]
    return float(cfg.num_features * h0 * w0 // (1 << cfg.num_stages)) + (
        0 if cfg.features_only else cfg.num_features * cfg.num_classes
    )


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
