"""Focal-fast's static neighbour sets: which keys each window attends to, and where they sit.

Focal-fast (the official `focal_transformer_v2.py`) gives every window of a stage
map two lists of keys, fixed when the model is built from positions only:

- level 0: the K0 = min(topK, H*W) tokens of the map nearest to the window's centre
  token `(ws*i + ws//2, ws*j + ws//2)`;
- level 1: the K1 = min(topK, nWh*nWw) pooled windows nearest to the window's grid
  position `(i, j)`, in window units.

Distances are Euclidean; the official code keeps the K smallest with `torch.topk`
on CPU. The cut nearly always falls inside a tie (lattice points come in groups of
4 and 8), and torch keeps an implementation-defined subset of the tied candidates,
not the lowest indices. So the set is part of the weights: the official buffers
`topk_cloest_indice_{0,1}` of a checkpoint are used when they fit, and
`official_selection` (which calls torch.topk exactly as the official constructor
does) only where a model has none for its size.

The bias of a key is an MLP of the coordinate (dy, dx) = query token minus key
position, in tokens of the stage map (a pooled window sits at its centre). Those
coordinates are integers in [-(H-1), H-1] x [-(W-1), W-1], so a block evaluates each
MLP once per possible coordinate (`coordinate_grid`) and gathers its bias with a
constant index (`bias_index`): the same numbers as the official per-key MLP, and a
constant once exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from focal.geometry import BlockGeometry, unpartition_index


@dataclass(frozen=True)
class TopKGeometry(BlockGeometry):
    """A Focal-fast block: no neighbour ring, no padding; keys from the two top-K levels."""

    top_k: int = 64

    @property
    def level_keys(self) -> tuple[int, ...]:
        """(K0,) or (K0, K1): the keys per window of each level."""
        k0 = min(self.top_k, self.height * self.width)
        return (k0, min(self.top_k, self.num_windows)) if self.pooled else (k0,)

    @property
    def num_neighbor_keys(self) -> int:
        return 0

    @property
    def num_pooled_keys(self) -> int:
        return self.level_keys[1] if self.pooled else 0

    @property
    def num_keys(self) -> int:
        return sum(self.level_keys)

    def level_grid(self, level: int) -> tuple[int, int]:
        """The candidate grid of a level: the stage map (0) or the window grid (1)."""
        return (self.height, self.width) if level == 0 else (self.windows_h, self.windows_w)


def _arange(*bounds: int) -> Tensor:
    """Always on the CPU: the official rule is torch.topk on CPU, and CUDA's may keep other tie members."""
    return torch.arange(*bounds, device="cpu")


def size_problem(height: int, width: int, window: int) -> str | None:
    """Why the official v2 code cannot run a stage map of this size (it has no padding); None if it can."""
    if height % window or width % window:
        return f"a {height}x{width} stage map cannot be cut into {window}x{window} windows"
    return None


def _query_points(g: TopKGeometry, level: int) -> Tensor:
    """[nW, 2] reference point of each window: its centre token (level 0) or its grid cell (level 1)."""
    i, j = torch.meshgrid(_arange(g.windows_h), _arange(g.windows_w), indexing="ij")
    points = torch.stack([i.flatten(), j.flatten()], dim=1)
    return points * g.window + g.window // 2 if level == 0 else points


def _candidate_points(g: TopKGeometry, level: int) -> Tensor:
    rows, cols = g.level_grid(level)
    i, j = torch.meshgrid(_arange(rows), _arange(cols), indexing="ij")
    return torch.stack([i.flatten(), j.flatten()], dim=1)


def squared_distances(g: TopKGeometry, level: int) -> Tensor:
    """[nW, candidates] int64 squared distance from each window's reference point to each candidate."""
    diff = _query_points(g, level)[:, None, :] - _candidate_points(g, level)[None, :, :]
    return (diff * diff).sum(-1)


def official_selection(g: TopKGeometry, level: int) -> Tensor:
    """[nW, K] the candidates the official constructor keeps (torch.topk on CPU of the negated
    float32 distances, as there; the tie members it keeps are torch's choice)."""
    distances = squared_distances(g, level).float().sqrt()
    return torch.topk(-distances, g.level_keys[level], dim=1).indices


def selection_problem(indices: Tensor, g: TopKGeometry, level: int) -> str | None:
    """Why `indices` is not a valid level selection for this geometry; None if it is.

    Valid: shape [nW, K], every row K distinct candidates, none farther than any candidate
    left out (ties at the K-th distance may be broken either way; the order does not matter).
    """
    expected = (g.num_windows, g.level_keys[level])
    if tuple(indices.shape) != expected:
        return f"shape {tuple(indices.shape)}, expected {expected}"
    if indices.dtype not in (torch.int64, torch.int32):
        return f"dtype {indices.dtype}, expected int64 or int32"
    indices = indices.cpu()
    rows, cols = g.level_grid(level)
    if int(indices.min()) < 0 or int(indices.max()) >= rows * cols:
        return f"index out of range [0, {rows * cols})"
    if bool((indices.sort(dim=1).values.diff(dim=1) == 0).any()):
        return "a window lists the same key twice"
    distances = squared_distances(g, level)
    chosen = distances.gather(1, indices.long())
    left_out = distances.scatter(1, indices.long(), torch.iinfo(torch.int64).max)
    bad = chosen.max(dim=1).values > left_out.min(dim=1).values
    if bool(bad.any()):
        window = int(bad.nonzero()[0, 0])
        return f"window {window} keeps a key farther away than one it leaves out (not the {expected[1]} nearest)"
    return None


def coordinates(indices: Tensor, g: TopKGeometry, level: int) -> Tensor:
    """[nW, ws*ws, K, 2] float32 (dy, dx) of query token minus key, exactly the official
    `topk_cloest_coords_{level}` buffer for these indices."""
    return _offsets(indices, g, level).float()


def _offsets(indices: Tensor, g: TopKGeometry, level: int) -> Tensor:
    """`coordinates` as int64: whole tokens of the stage map."""
    ws = g.window
    grid_cols = g.level_grid(level)[1]
    indices = indices.cpu().long()
    keys = torch.stack([indices // grid_cols, indices % grid_cols], dim=-1)  # [nW, K, 2]
    if level == 1:  # a pooled window sits at its centre token
        keys = keys * ws + ws // 2
    corner = _query_points(g, 1) * ws  # [nW, 2] top-left token of each window
    a, b = torch.meshgrid(_arange(ws), _arange(ws), indexing="ij")
    offsets = torch.stack([a.flatten(), b.flatten()], dim=1)  # [ws*ws, 2]
    queries = corner[:, None, :] + offsets[None, :, :]  # [nW, ws*ws, 2]
    return queries[:, :, None, :] - keys[:, None, :, :]


def coordinate_grid(g: TopKGeometry) -> Tensor:
    """[(2H-1)*(2W-1), 2] float32: every (dy, dx) a key of this stage can have, row-major."""
    dy = _arange(-(g.height - 1), g.height)
    dx = _arange(-(g.width - 1), g.width)
    y, x = torch.meshgrid(dy, dx, indexing="ij")
    return torch.stack([y.flatten(), x.flatten()], dim=1).float()


def bias_index(selections: list[Tensor], g: TopKGeometry) -> Tensor:
    """[nW * ws*ws * (K0+K1)] int64 rows of the per-level bias tables stacked (level 0's grid, then
    level 1's), for each window, query token and key in key order."""
    span = 2 * g.width - 1
    cells = span * (2 * g.height - 1)
    parts = []
    for level, indices in enumerate(selections):
        coords = _offsets(indices, g, level)
        parts.append((coords[..., 0] + g.height - 1) * span + coords[..., 1] + g.width - 1 + level * cells)
    return torch.cat(parts, dim=-1).flatten()


def key_index(selections: list[Tensor], g: TopKGeometry) -> Tensor:
    """[nW * (K0+K1)] int64 rows of the stage's key table [window-order tokens; pooled tokens]."""
    window_order = torch.tensor(unpartition_index(g))  # the window-order row of each row-major token
    parts = [window_order[selections[0]]]
    if len(selections) > 1:
        parts.append(g.num_windows * g.window_area + selections[1])
    return torch.cat(parts, dim=1).flatten()
