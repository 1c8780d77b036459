"""Focal Transformer built on static window gathers.

Paper: Yang et al., "Focal Self-attention for Local-Global Interactions in
Vision Transformers", NeurIPS 2021. Weights: the official ImageNet-1K
checkpoints of microsoft/Focal-Transformer load unchanged (see
`focal.checkpoint`), and the outputs match the official code to ~1e-6 in fp32.

How this implementation deviates from the official one:
- The model is built for one input size (as the official one is), and every
  index it needs (padding + window partition, the neighbour ring with its cyclic
  wrap-around, the pooled windows, the key masks, the relative-position-bias
  layouts) is computed once at build time from plain ints (`focal.geometry`) and
  kept as non-persistent buffers. The forward pass uses gathers with those
  constant indices, matmuls, softmax and element-wise ops only: no `roll`,
  `unfold`, in-place slice assignment or batch size baked into a reshape. It
  exports to a small ONNX graph that is correct at every batch size.
- Relative-position biases and masks are a pure function of the weights
  (`FocalWindowAttention.attention_bias`), so an exporter folds them into one
  constant per block.
- Masked keys use -1e4 instead of the official -100 (whose softmax weights are
  denormal floats, slow on CPUs and worth nothing); see `focal.geometry`. The
  golden fixtures agree either way.
- Tokens stay in window order for a whole stage (one gather in, one out); the
  q/k/v projection runs as a q part (window tokens, softmax scale folded in)
  and a k/v part (window and pooled tokens); Linear layers run on 2-D token
  matrices (one Gemm with the bias fused, once exported).
- Inference only: dropout and stochastic depth are not built; `use_shift`, the
  'mean'/'max'/'conv' pooling methods and focal levels > 2 (none of which a
  released model uses) raise `NotImplementedError`.
- `features_only=True` gives the detection backbone (four NCHW stage outputs
  through `norm0`..`norm3`) instead of the classifier.

Focal-fast (`family="focal_fast"`, the official `focal_transformer_v2.py`) is the
same model with another attention (`FocalFastAttention`): each window attends to
its K nearest tokens and K nearest pooled windows, fixed per input size, with a
bias from a small MLP of each key's coordinate. It shares everything else here
(stem, stages in window order, pooling, MLP, head, parameter names) and matches
the official v2 logits to ~5e-7 on its golden fixtures. Two rules of its own:
- **Sizes.** The official v2 code has no padding, so it runs only where every
  stage map can be cut into whole windows (with the conv stem of the released
  configs: sides that are multiples of 224, e.g. 224, 448, 224x448). This implementation keeps that rule
  and refuses other sizes when the model is built, naming the stage, instead of
  inventing a padding the weights were never trained with.
- **Neighbour sets.** The top-K selections are the checkpoint's index buffers
  when it has them for the size, else the official rule's (see `focal.topk`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focal import geometry, topk
from focal.config import FocalConfig

# Above this many elements, a block adds its relative-position bias and its
# per-window mask as two broadcast constants instead of one fused
# [heads, windows, window_area, keys] constant (large inputs, e.g. detection
# canvases, would otherwise carry hundreds of MB of constants).
FUSED_BIAS_MAX_ELEMENTS = 1 << 22


def _index_buffer(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.long)


def linear_tokens(layer: nn.Module, x: Tensor) -> Tensor:
    """A Linear on [B, N, C] tokens computed as one [B*N, C] matmul.

    Same numbers; exported, it is one Gemm with the bias in its epilogue instead
    of a batched MatMul followed by a separate bias Add over the whole output.
    """
    out: Tensor = layer(x.reshape(-1, x.shape[-1]))
    return out.reshape(-1, x.shape[1], out.shape[-1])


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return linear_tokens(self.fc2, self.act(linear_tokens(self.fc1, x)))


class GatheredWindowAttention(nn.Module):
    """Attention of window-order queries to keys fetched with one constant gather.

    The key table is [window-order tokens; pooled tokens]; `key_index` lists, for every
    window, the rows of its `num_keys` keys, and `attention_bias()` is added to q.k
    before the softmax. The two families differ only in these (`FocalWindowAttention`,
    `FocalFastAttention`); the parameters `qkv` and `proj` have the official names.
    """

    key_index: Tensor
    qkv: nn.Linear
    proj: nn.Linear

    def __init__(self, dim: int, num_heads: int, geom: geometry.BlockGeometry, qk_scale: float | None) -> None:
        super().__init__()
        self.geom = geom
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.num_keys = geom.num_keys

    def attention_bias(self) -> Tensor:
        """Everything added to q.k before the softmax, broadcast to [heads, windows, window_area, keys]."""
        raise NotImplementedError

    def mask_scores(self, attn: Tensor) -> Tensor:
        """A last additive term on the scores [B, heads, windows, area, keys]; none by default."""
        return attn

    def forward(self, windows: Tensor, pooled: Tensor | None) -> Tensor:
        """windows: [B, num_windows * window_area, C]; pooled: [B, num_windows, C] or None."""
        g = self.geom
        heads, head_dim = self.num_heads, self.head_dim
        n_query = g.num_windows * g.window_area
        tokens = windows if pooled is None else torch.cat([windows, pooled], dim=1)
        n_tokens = tokens.shape[1]
        # The qkv Linear is applied as two: q for the window tokens only, with the
        # softmax scale folded into its weights (a constant once exported), and k/v
        # for the window and pooled tokens.
        weight, bias = self.qkv.weight, self.qkv.bias
        dim = self.dim
        q = F.linear(
            windows.reshape(-1, dim),
            weight[:dim] * self.scale,
            None if bias is None else bias[:dim] * self.scale,
        )
        q = q.reshape(-1, g.num_windows, g.window_area, heads, head_dim).permute(0, 3, 1, 2, 4)
        kv = F.linear(tokens.reshape(-1, dim), weight[dim:], None if bias is None else bias[dim:])
        kv = kv.reshape(-1, n_tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        # One gather per k and v fetches every key of every window.
        k = kv[0].index_select(2, self.key_index)
        v = kv[1].index_select(2, self.key_index)
        k = k.reshape(-1, heads, g.num_windows, self.num_keys, head_dim)
        v = v.reshape(-1, heads, g.num_windows, self.num_keys, head_dim)

        attn = self.mask_scores(q @ k.transpose(-2, -1) + self.attention_bias())
        out = attn.softmax(dim=-1) @ v  # [B, heads, windows, area, head_dim]
        out = out.permute(0, 2, 3, 1, 4).reshape(-1, n_query, self.dim)
        return linear_tokens(self.proj, out)


class FocalWindowAttention(GatheredWindowAttention):
    """Focal self-attention (v1): the window, its neighbour ring and the pooled focal window."""

    window_bias_index: Tensor
    pooled_bias_index: Tensor
    key_mask: Tensor
    relative_position_bias_table_to_neighbors: nn.Parameter
    relative_position_bias_table_to_windows: nn.ParameterList

    def __init__(
        self,
        dim: int,
        num_heads: int,
        geom: geometry.BlockGeometry,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__(dim, num_heads, geom, qk_scale)
        w, fw = geom.window, geom.focal_window

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, num_heads))
        if geom.expand > 0:
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, geom.window_area, geom.num_neighbor_keys)
            )
        if geom.pooled:
            self.relative_position_bias_table_to_windows = nn.ParameterList(
                [nn.Parameter(torch.zeros(num_heads, (w + fw - 1) ** 2))]
            )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

        self.register_buffer(
            "window_bias_index", _index_buffer(geometry.relative_position_index(w, w)), persistent=False
        )
        if geom.pooled:
            self.register_buffer(
                "pooled_bias_index",
                _index_buffer(geometry.relative_position_index(w, fw)),
                persistent=False,
            )
        self.register_buffer("key_index", _index_buffer(geometry.key_index(geom)), persistent=False)
        mask = torch.tensor(geometry.key_mask(geom), dtype=torch.float32).unsqueeze(1)
        self.register_buffer("key_mask", mask, persistent=False)  # [windows, 1, keys]
        self.fuse_mask = num_heads * geom.num_windows * geom.window_area * geom.num_keys <= (FUSED_BIAS_MAX_ELEMENTS)

    def relative_position_bias(self) -> Tensor:
        """[heads, window_area, keys]: the learned biases laid out in key order."""
        g, heads, area = self.geom, self.num_heads, self.geom.window_area
        parts = [self.relative_position_bias_table[self.window_bias_index].view(area, area, heads).permute(2, 0, 1)]
        if g.expand > 0:
            parts.append(self.relative_position_bias_table_to_neighbors[0])
        if g.pooled:
            table = self.relative_position_bias_table_to_windows[0]
            parts.append(table[:, self.pooled_bias_index].view(heads, area, g.num_pooled_keys))
        return torch.cat(parts, dim=-1)

    def attention_bias(self) -> Tensor:
        """[heads, windows or 1, window_area, keys]: the biases, with the key mask when it is fused."""
        bias = self.relative_position_bias().unsqueeze(1)
        return bias + self.key_mask if self.fuse_mask else bias

    def mask_scores(self, attn: Tensor) -> Tensor:
        return attn if self.fuse_mask else attn + self.key_mask


class FocalFastAttention(GatheredWindowAttention):
    """Focal-fast attention (v2): each window's top-K nearest tokens and pooled windows.

    The official buffers `topk_cloest_indice_{0,1}` are kept (persistent, official
    names): they define the model (see `focal.topk`). Loading a state dict checks
    them first (ValueError for one that is no valid selection, before this module
    changes) and then derives the key gather and bias layout from them again. The bias of
    each key is `coord2rpb_all[level]` (Linear-ReLU-Linear, official names) of its
    coordinate, evaluated on every possible coordinate and gathered.
    """

    bias_index: Tensor
    coordinate_grid: Tensor

    def __init__(
        self,
        dim: int,
        num_heads: int,
        geom: topk.TopKGeometry,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__(dim, num_heads, geom, qk_scale)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        levels = len(geom.level_keys)
        self.coord2rpb_all = nn.ModuleList(
            nn.Sequential(nn.Linear(2, self.head_dim), nn.ReLU(), nn.Linear(self.head_dim, num_heads))
            for _ in range(levels)
        )
        for level in range(levels):
            self.register_buffer(f"topk_cloest_indice_{level}", topk.official_selection(geom, level))
        self.register_buffer("coordinate_grid", topk.coordinate_grid(geom), persistent=False)
        self.register_buffer("key_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("bias_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.derive_gathers()
        self.register_load_state_dict_pre_hook(_check_selections_before_load)
        self.register_load_state_dict_post_hook(_derive_gathers_after_load)

    @property
    def topk_geom(self) -> topk.TopKGeometry:
        """`geom`, typed as what it is here."""
        assert isinstance(self.geom, topk.TopKGeometry)
        return self.geom

    def selections(self) -> list[Tensor]:
        """The key selection of each level, [windows, K] (the official index buffers)."""
        return [getattr(self, f"topk_cloest_indice_{level}") for level in range(len(self.coord2rpb_all))]

    def derive_gathers(self) -> None:
        """Rebuild the key gather and the bias layout from the index buffers (after a load)."""
        device = self.coordinate_grid.device
        selections = [indices.cpu().long() for indices in self.selections()]
        self.key_index = topk.key_index(selections, self.topk_geom).to(device)
        self.bias_index = topk.bias_index(selections, self.topk_geom).to(device)

    def attention_bias(self) -> Tensor:
        """[heads, windows, window_area, keys]: each key's MLP bias (a constant once exported)."""
        g = self.geom
        table = torch.cat([mlp(self.coordinate_grid) for mlp in self.coord2rpb_all])  # [cells * levels, heads]
        bias = table.index_select(0, self.bias_index)
        return bias.reshape(g.num_windows, g.window_area, self.num_keys, self.num_heads).permute(3, 0, 1, 2)


def _check_selections_before_load(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: Any) -> None:
    """A FocalFastAttention's load pre-hook: refuse index buffers that are no valid top-K selection before
    any of the module's tensors is replaced (so its buffers and gathers stay consistent)."""
    assert isinstance(module, FocalFastAttention)
    for level in range(len(module.topk_geom.level_keys)):
        indices = state_dict.get(f"{prefix}topk_cloest_indice_{level}")
        if indices is not None:
            problem = topk.selection_problem(indices, module.topk_geom, level)
            if problem:
                raise ValueError(f"{prefix}topk_cloest_indice_{level}: not a valid top-K selection: {problem}")


def _derive_gathers_after_load(module: nn.Module, _incompatible_keys: Any) -> None:
    assert isinstance(module, FocalFastAttention)
    module.derive_gathers()


class FocalTransformerBlock(nn.Module):
    """One block, on tokens in window order (see `FocalStage`).

    LayerNorm, the MLP and the residual adds are token-wise, so they run in
    window order as well; only attention cares about the order.
    """

    valid_tokens: Tensor

    def __init__(
        self,
        dim: int,
        num_heads: int,
        geom: geometry.BlockGeometry,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        use_layerscale: bool,
        layerscale_value: float,
    ) -> None:
        super().__init__()
        self.geom = geom
        self.dim = dim
        self.pool_layers = nn.ModuleList()
        if geom.pooled:
            self.pool_layers.append(nn.Linear(geom.window_area, 1))
        self.norm1 = nn.LayerNorm(dim)
        self.attn: GatheredWindowAttention
        if isinstance(geom, topk.TopKGeometry):
            self.attn = FocalFastAttention(dim, num_heads, geom, qkv_bias, qk_scale)
        else:
            self.attn = FocalWindowAttention(dim, num_heads, geom, qkv_bias, qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.use_layerscale = use_layerscale
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
        if geom.needs_padding:
            valid = [float(i != geom.num_tokens) for i in geometry.partition_index(geom)]
            self.register_buffer("valid_tokens", torch.tensor(valid).unsqueeze(-1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, windows * window_area, C] tokens in padded window order."""
        g = self.geom
        y = self.norm1(x)
        if g.needs_padding:  # the official code zero-pads after norm1: padded cells enter as zeros
            y = y * self.valid_tokens
        pooled = None
        if self.pool_layers:
            fc = self.pool_layers[0]
            tokens = y.reshape(-1, g.num_windows, g.window_area, self.dim)
            pooled = (fc.weight @ tokens).reshape(-1, g.num_windows, self.dim) + fc.bias
        y = self.attn(y, pooled)
        if self.use_layerscale:
            x = x + self.gamma_1 * y
            out: Tensor = x + self.gamma_2 * self.mlp(self.norm2(x))
        else:
            x = x + y
            out = x + self.mlp(self.norm2(x))
        return out


class PatchEmbed(nn.Module):
    """Strided conv + LayerNorm; the stem and the downsampling between stages."""

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        kernel: int,
        stride: int,
        padding: int,
        norm: bool,
        pre_norm: bool,
    ) -> None:
        super().__init__()
        if pre_norm:
            self.pre_norm = nn.GroupNorm(1, in_chans)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if norm else None
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def output_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.kernel) // self.stride + 1

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, H'*W', embed_dim]."""
        if hasattr(self, "pre_norm"):
            x = self.pre_norm(x)
        tokens: Tensor = self.proj(x).flatten(2).transpose(1, 2)
        if self.norm is not None:
            tokens = self.norm(tokens)
        return tokens


class FocalStage(nn.Module):
    """One stage: its blocks, then the downsampling into the next stage (official key names).

    The blocks of a stage share one window layout, so the tokens are gathered into
    padded window order once when the stage starts and back (cropped) once when
    it ends, instead of in every block. Padded cells are carried along: they
    start as zeros, each block zeroes them again after norm1 (as the official
    padding does), and whatever accumulates in them is never read by a real token.
    """

    partition_index: Tensor
    unpartition_index: Tensor

    def __init__(self, blocks: list[FocalTransformerBlock], downsample: PatchEmbed | None) -> None:
        super().__init__()
        layouts = {(b.geom.height, b.geom.width, b.geom.window) for b in blocks}
        if len(layouts) != 1:
            raise ValueError(f"the blocks of a stage must share one window layout, got {sorted(layouts)}")
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        g = blocks[0].geom
        self.needs_padding = g.needs_padding
        self.register_buffer("partition_index", _index_buffer(geometry.partition_index(g)), persistent=False)
        self.register_buffer("unpartition_index", _index_buffer(geometry.unpartition_index(g)), persistent=False)

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """x: [B, H*W, C] row-major -> (this stage's output tokens, the next stage's input tokens)."""
        if self.needs_padding:  # padded cells read an appended zero row
            x = F.pad(x, (0, 0, 0, 1))
        x = x.index_select(1, self.partition_index)
        for block in self.blocks:
            x = block(x)
        x = x.index_select(1, self.unpartition_index)
        if self.downsample is None:
            return x, x
        nchw = x.reshape(-1, height, width, x.shape[-1]).permute(0, 3, 1, 2)
        return x, self.downsample(nchw)


class FocalTransformer(nn.Module):
    """Focal Transformer for one input size.

    Build it with a `FocalConfig`, or with the official constructor keywords:
    `FocalTransformer(img_size=(256, 320), embed_dim=96, depths=[2, 2, 6, 2], ...)`.
    """

    config: FocalConfig
    resolutions: list[tuple[int, int]]
    geometries: list[list[geometry.BlockGeometry]]

    def __init__(self, config: FocalConfig | None = None, **official_kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = FocalConfig.from_kwargs(**official_kwargs)
        elif official_kwargs:
            raise TypeError("pass either a FocalConfig or keyword arguments, not both")
        self.config = config
        cfg = config
        self.num_classes = cfg.num_classes
        self.num_features = cfg.num_features
        norm = cfg.patch_norm
        pre_norm = cfg.use_pre_norm and norm  # the official stem has no pre-norm without patch_norm
        if cfg.use_conv_embed:
            self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, 7, 4, 2, norm, pre_norm)
        else:
            p = cfg.patch_size
            self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, p, p, 0, norm, pre_norm)
        self.resolutions = cfg.stage_resolutions()
        self._check_resolutions()
        if cfg.ape:
            h, w = self.resolutions[0]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, h * w, cfg.embed_dim))

        self.geometries = []
        stages = []
        for i, (dim, (h, w)) in enumerate(zip(cfg.stage_dims(), self.resolutions, strict=True)):
            blocks, geoms = [], []
            for j in range(cfg.depths[i]):
                geom = geometry.block_geometry(
                    h,
                    w,
                    window_size=cfg.window_size,
                    expand_size=_block_expand_size(cfg, i, j),
                    focal_window=cfg.focal_windows[i],
                    focal_level=cfg.focal_levels[i],
                    pooled=cfg.focal_pool != "none" and i in cfg.focal_stages,
                )
                if cfg.family == "focal_fast":  # no ring; the window clamp and pooled level as in v1
                    assert cfg.focal_topK is not None  # FocalConfig fills in the official default
                    geom = topk.TopKGeometry(**{**vars(geom), "expand": 0, "top_k": cfg.focal_topK})
                    problem = topk.size_problem(h, w, geom.window)
                    if problem:
                        raise ValueError(
                            f"input size {cfg.img_size[0]}x{cfg.img_size[1]} does not work with Focal-fast: "
                            f"stage {i + 1}: {problem} (the official v2 code has no padding; with the released "
                            "configs use sides that are multiples of 224, e.g. 224, 448, 224x448)"
                        )
                geoms.append(geom)
                blocks.append(
                    FocalTransformerBlock(
                        dim,
                        cfg.num_heads[i],
                        geom,
                        cfg.mlp_ratio,
                        cfg.qkv_bias,
                        cfg.qk_scale,
                        cfg.use_layerscale,
                        cfg.layerscale_value,
                    )
                )
            downsample = None
            if i < cfg.num_stages - 1:
                k, s, pad = (3, 2, 1) if cfg.use_conv_embed else (2, 2, 0)
                downsample = PatchEmbed(dim, 2 * dim, k, s, pad, True, cfg.use_pre_norm)
            self.geometries.append(geoms)
            stages.append(FocalStage(blocks, downsample))
        self.layers = nn.ModuleList(stages)

        if cfg.features_only:
            for i, dim in enumerate(cfg.stage_dims()):
                self.add_module(f"norm{i}", nn.LayerNorm(dim))
        else:
            self.norm = nn.LayerNorm(self.num_features)
            self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self._init_focal_parameters()

    def _check_resolutions(self) -> None:
        """Refuse sizes where the convs would not produce the official stage sizes."""
        cfg = self.config
        h, w = (self.patch_embed.output_size(s) for s in cfg.img_size)
        sizes = [(h, w)]
        k, s, pad = (3, 2, 1) if cfg.use_conv_embed else (2, 2, 0)
        for _ in range(cfg.num_stages - 1):
            h, w = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
            sizes.append((h, w))
        if min(min(r) for r in [*sizes, *self.resolutions]) < 1:
            raise ValueError(
                f"input size {cfg.img_size[0]}x{cfg.img_size[1]} is too small: the last stage would be "
                f"{sizes[-1][0]}x{sizes[-1][1]} (each side needs at least {cfg.patch_size << (cfg.num_stages - 1)})"
            )
        if sizes != self.resolutions:
            raise ValueError(
                f"input size {cfg.img_size[0]}x{cfg.img_size[1]} does not work with this model: the stage "
                f"sizes would be {sizes} but the official model expects {self.resolutions}; "
                f"use sides that are multiples of {224 if cfg.family == 'focal_fast' else 32}"
            )

    def _init_focal_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, FocalWindowAttention):
                for name, param in module.named_parameters(recurse=False):
                    if name.startswith("relative_position_bias_table"):
                        nn.init.trunc_normal_(param, std=0.02)
                for table in getattr(module, "relative_position_bias_table_to_windows", []):
                    nn.init.trunc_normal_(table, std=0.02)
            elif isinstance(module, FocalTransformerBlock):
                for fc in module.pool_layers:
                    assert isinstance(fc, nn.Linear)
                    nn.init.constant_(fc.weight, 1.0 / fc.in_features)
                    nn.init.zeros_(fc.bias)

    def _stem(self, x: Tensor) -> Tensor:
        h, w = self.config.img_size
        tracing = torch.jit.is_tracing()  # type: ignore[attr-defined]
        if not tracing and x.shape[-2:] != (h, w):  # a traced graph has fixed H, W anyway
            raise ValueError(f"this model was built for {h}x{w} inputs, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        if self.config.ape:
            x = x + self.absolute_pos_embed
        return x

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Token outputs [B, H*W, C] of every stage (before its downsampling)."""
        x = self._stem(x)
        outs = []
        for stage, (h, w) in zip(self.layers, self.resolutions, strict=True):
            out, x = stage(x, h, w)
            outs.append(out)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """Final normed tokens [B, H*W, num_features] (classifier mode)."""
        tokens: Tensor = self.norm(self.forward_stages(x)[-1])
        return tokens

    def forward_head(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(x.mean(dim=1))
        return logits

    def block(self, stage: int, index: int) -> FocalTransformerBlock:
        """Typed access to one block: `model.block(0, 1)` is `model.layers[0].blocks[1]`."""
        block = self.layers[stage].blocks[index]  # type: ignore[index]
        assert isinstance(block, FocalTransformerBlock)
        return block

    def forward_pyramid(self, x: Tensor) -> list[Tensor]:
        """Four NCHW maps (strides 4, 8, 16, 32; channels C..8C) through norm0..norm3."""
        maps = []
        for i, (tokens, (h, w)) in enumerate(zip(self.forward_stages(x), self.resolutions, strict=True)):
            tokens = getattr(self, f"norm{i}")(tokens)
            maps.append(tokens.transpose(1, 2).reshape(-1, tokens.shape[-1], h, w))
        return maps

    def forward(self, x: Tensor) -> Any:
        if self.config.features_only:
            return self.forward_pyramid(x)
        return self.forward_head(self.forward_features(x))


def _block_expand_size(cfg: FocalConfig, stage: int, block: int) -> int:
    # As in the official code, expand_stages is accepted but unused: every
    # stage takes its expand size; expand_layer picks which blocks expand.
    skip = {"all": -1, "even": 0, "odd": 1}[cfg.expand_layer]
    return 0 if block % 2 == skip else cfg.expand_sizes[stage]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
