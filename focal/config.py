"""Model configuration and the registry of named variants.

`FocalConfig` takes exactly the keyword arguments of the official
`FocalTransformer` constructors (microsoft/Focal-Transformer,
`classification/focal_transformer.py` for Focal and `focal_transformer_v2.py`
for Focal-fast, which adds `focal_topK`), with the same defaults, so any
official-style config can be built; `family` says which of the two it is. The
variants below are the nine released ImageNet-1K models; their long official
names are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Keyword arguments of the official constructor that only matter for training.
# They are accepted so official configs build unchanged, and ignored.
TRAINING_ONLY_KWARGS = frozenset({"drop_rate", "attn_drop_rate", "drop_path_rate", "use_checkpoint", "norm_layer"})

# Pooling methods of the official code that this implementation supports.
SUPPORTED_FOCAL_POOLS = ("fc", "none")

# The two architectures: Focal (v1: neighbour ring + pooled focal window) and Focal-fast
# (v2: the K nearest tokens and the K nearest pooled windows, chosen when the model is built).
FAMILIES = ("focal", "focal_fast")
OFFICIAL_V2_TOPK = 64  # the v2 constructor's default `focal_topK`; the released configs use 128


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"img_size must be an int or (height, width), got {value!r}")
    return (pair[0], pair[1])


@dataclass(frozen=True)
class FocalConfig:
    """Hyper-parameters of a Focal Transformer, named and defaulted as in the official code.

    `features_only=True` builds the detection backbone mode: the four stage
    outputs, each through its own LayerNorm (`norm0`..`norm3`), no head.
    `family="focal_fast"` builds Focal-fast (the official v2 code), where
    `focal_topK` (default 64, as there) bounds the keys of each level and
    `expand_*` and `focal_windows` are accepted but unused, as there.
    """

    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    ape: bool = False
    patch_norm: bool = True
    use_shift: bool = False
    focal_stages: tuple[int, ...] = (0, 1, 2, 3)
    focal_levels: tuple[int, ...] = (1, 1, 1, 1)
    focal_windows: tuple[int, ...] = (7, 5, 3, 1)
    focal_pool: str = "fc"
    expand_stages: tuple[int, ...] = (0, 1, 2, 3)
    expand_sizes: tuple[int, ...] = (3, 3, 3, 3)
    expand_layer: str = "all"
    use_conv_embed: bool = False
    use_layerscale: bool = False
    layerscale_value: float = 1e-4
    use_pre_norm: bool = False
    features_only: bool = False
    focal_topK: int | None = None  # noqa: N815 - the official keyword; Focal-fast only (None: its default)
    family: str = "focal"
    ignored_training_kwargs: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise in place once
        set_(self, "img_size", _pair(self.img_size))
        for name in (
            "depths",
            "num_heads",
            "focal_stages",
            "focal_levels",
            "focal_windows",
            "expand_stages",
            "expand_sizes",
        ):
            set_(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.family == "focal_fast" and self.focal_topK is None:
            set_(self, "focal_topK", OFFICIAL_V2_TOPK)
        self._validate()

    def _validate(self) -> None:
        n = len(self.depths)
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.family == "focal" and self.focal_topK is not None:
            raise ValueError("focal_topK is an argument of Focal-fast (family='focal_fast'), not of Focal")
        if self.focal_topK is not None and self.focal_topK < 1:
            raise ValueError(f"focal_topK must be at least 1, got {self.focal_topK}")
        if self.family == "focal_fast" and self.features_only:
            raise NotImplementedError(
                "Focal-fast as a detection backbone is not supported: no detector was released with it, and "
                "it runs only at sides that are multiples of 224 (it has no padding), which detection canvases are not"
            )
        for name in ("num_heads", "focal_levels", "focal_windows", "expand_sizes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per stage ({n}), got {getattr(self, name)}")
        if self.use_shift:
            raise NotImplementedError(
                "use_shift=True is not supported (no released Focal Transformer uses window shifts)"
            )
        if self.focal_pool not in SUPPORTED_FOCAL_POOLS:
            raise NotImplementedError(
                f"focal_pool={self.focal_pool!r} is not supported; supported: {SUPPORTED_FOCAL_POOLS} "
                "(every released model uses 'fc')"
            )
        if self.expand_layer not in ("all", "even", "odd"):
            raise ValueError(f"expand_layer must be 'all', 'even' or 'odd', got {self.expand_layer!r}")
        for i in range(n):
            dim = self.embed_dim << i
            if dim % self.num_heads[i]:
                raise ValueError(f"stage {i}: dim {dim} is not divisible by {self.num_heads[i]} heads")
            if self.focal_levels[i] > 2:
                raise NotImplementedError(
                    f"stage {i}: focal_level {self.focal_levels[i]} > 2 is not supported "
                    "(released models use 2: one pooled level)"
                )
            if self.family == "focal_fast" and self.focal_levels[i] < 1:
                raise ValueError(f"stage {i}: Focal-fast needs focal_level 1 or 2, got {self.focal_levels[i]}")
            if (
                self.family == "focal_fast"
                and self.focal_levels[i] == 2
                and (self.focal_pool == "none" or i not in self.focal_stages)
            ):
                # The official v2 attention then reads a pooled map that the block never made (IndexError).
                raise ValueError(
                    f"stage {i}: Focal-fast with focal_level 2 needs a pooled level: focal_pool 'fc' and "
                    "the stage in focal_stages (the official v2 code fails otherwise)"
                )
            if self.family == "focal_fast":
                continue  # focal_windows and expand_sizes are accepted and unused there, whatever their values
            if self.focal_windows[i] % 2 != 1:
                raise ValueError(f"stage {i}: focal window must be odd, got {self.focal_windows[i]}")
            if not 0 <= self.expand_sizes[i] < self.window_size:
                raise ValueError(f"stage {i}: expand size must be in [0, window_size), got {self.expand_sizes[i]}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> FocalConfig:
        """Build from official constructor keywords; training-only ones are dropped.

        `focal_topK` exists only in the Focal-fast (v2) constructor, so keywords that
        contain it build Focal-fast unless `family` says otherwise.
        """
        if "focal_topK" in kwargs and "family" not in kwargs:
            kwargs = {**kwargs, "family": "focal_fast"}
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = tuple(sorted(k for k in kwargs if k in TRAINING_ONLY_KWARGS))
        unknown = sorted(k for k in kwargs if k not in known and k not in TRAINING_ONLY_KWARGS)
        if unknown:
            raise TypeError(
                f"unknown Focal Transformer argument(s): {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(known - {'ignored_training_kwargs'}))}"
            )
        kept = {k: v for k, v in kwargs.items() if k in known}
        return cls(**kept, ignored_training_kwargs=ignored)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def num_features(self) -> int:
        return self.embed_dim << (self.num_stages - 1)

    def stage_dims(self) -> list[int]:
        return [self.embed_dim << i for i in range(self.num_stages)]

    def stage_resolutions(self) -> list[tuple[int, int]]:
        """Feature-map size (H, W) of each stage, as the official model computes it."""
        h, w = self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size
        return [(h >> i, w >> i) for i in range(self.num_stages)]

    def replace(self, **changes: Any) -> FocalConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Variant:
    name: str
    official_name: str
    checkpoint_url: str
    overrides: dict[str, Any]

    def config(self, **overrides: Any) -> FocalConfig:
        return FocalConfig.from_kwargs(**{**self.overrides, **overrides})


_RELEASED = {
    # name: (embed_dim, depths, num_heads)
    "focal_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "focal_small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "focal_base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
# Shared by every released model (the official YAML configs).
_RELEASED_COMMON: dict[str, Any] = {
    "window_size": 7,
    "focal_pool": "fc",
    "focal_levels": (2, 2, 2, 2),
    "focal_windows": (7, 5, 3, 1),
    "expand_sizes": (3, 3, 3, 3),
    "expand_layer": "all",
    "use_shift": False,
    "patch_norm": True,
}
_CHECKPOINT_BASE = "https://projects4jw.blob.core.windows.net/model/focal-transformer/imagenet1k"
# Focal-fast (the official configs focalv2_*_useconv_patch4_window7_224): conv embedding only.
_FAST_COMMON: dict[str, Any] = {**_RELEASED_COMMON, "use_conv_embed": True, "family": "focal_fast", "focal_topK": 128}


def _build_registry() -> dict[str, Variant]:
    registry: dict[str, Variant] = {}
    for base, (embed_dim, depths, heads) in _RELEASED.items():
        size = base.split("_")[1]
        for useconv in (False, True):
            name = f"{base}_useconv" if useconv else base
            registry[name] = Variant(
                name=name,
                official_name=f"{name}_patch4_window7_224",
                checkpoint_url=(f"{_CHECKPOINT_BASE}/focal-{size}{'-useconv' if useconv else ''}-is224-ws7.pth"),
                overrides={
                    **_RELEASED_COMMON,
                    "family": "focal",
                    "embed_dim": embed_dim,
                    "depths": depths,
                    "num_heads": heads,
                    "use_conv_embed": useconv,
                },
            )
    for base, (embed_dim, depths, heads) in _RELEASED.items():
        size = base.split("_")[1]
        name = f"focal_fast_{size}"
        registry[name] = Variant(
            name=name,
            official_name=f"focalv2_{size}_useconv_patch4_window7_224",
            checkpoint_url=f"{_CHECKPOINT_BASE}/focalv2-{size}-useconv-is224-ws7.pth",
            overrides={**_FAST_COMMON, "embed_dim": embed_dim, "depths": depths, "num_heads": heads},
        )
    return registry


VARIANTS: dict[str, Variant] = _build_registry()
_ALIASES = {v.official_name: v.name for v in VARIANTS.values()}
# The official v2 YAMLs name their models without "useconv" (MODEL.NAME focalv2_tiny_patch4_window7_224).
_ALIASES |= {
    v.official_name.replace("_useconv", ""): v.name for v in VARIANTS.values() if v.name.startswith("focal_fast")
}


def variant_names(include_aliases: bool = False) -> list[str]:
    names = list(VARIANTS)
    return names + list(_ALIASES) if include_aliases else names


def get_variant(name: str) -> Variant:
    """Look a variant up by its short name or its official long name."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(variant_names(include_aliases=True))}")
    return VARIANTS[key]
