from __future__ import annotations

from collections import Counter

import pytest

from focal import geometry


def _geom(h: int, w: int, window: int = 7, expand: int = 3, fw: int = 5) -> geometry.BlockGeometry:
    return geometry.block_geometry(h, w, window, expand, fw, focal_level=2, pooled=True)


def test_neighbor_ring_has_132_keys_with_12_duplicates() -> None:
    offsets = geometry.neighbor_offsets(7, 3)
    assert len(offsets) == 132
    counts = Counter(offsets)
    assert sum(1 for c in counts.values() if c == 2) == 12
    # Every cell of the 13x13 neighbourhood outside the window is covered.
    ring = {(dy, dx) for dy in range(-3, 10) for dx in range(-3, 10)} - {(y, x) for y in range(7) for x in range(7)}
    assert set(offsets) == ring


def test_window_is_clamped_on_small_maps() -> None:
    g = _geom(6, 6)
    assert (g.window, g.expand, g.num_windows) == (6, 0, 1)
    g = _geom(7, 12)
    assert (g.window, g.expand, g.windows_h, g.windows_w) == (7, 0, 1, 2)
    assert _geom(8, 8).expand == 3


def test_partition_pads_with_the_zero_row_and_unpartition_inverts() -> None:
    g = _geom(8, 10)  # padded to 14x14
    part = geometry.partition_index(g)
    assert len(part) == 14 * 14
    assert part.count(g.num_tokens) == 14 * 14 - 80
    unpart = geometry.unpartition_index(g)
    assert [part[i] for i in unpart] == list(range(80))


def test_keys_wrap_around_cyclically() -> None:
    g = _geom(14, 14)
    index = geometry.key_index(g)
    window0 = index[: g.num_keys]
    # The first ring key of window (0, 0) comes from roll (-3, -3) at cell (0, 4): map cell (3, 7),
    # which lies in window (0, 1) at (3, 0).
    assert window0[g.window_area] == 1 * 49 + 3 * 7 + 0
    # The first key of roll (+3, +3) reads cell (-3, -3): it wraps to (11, 11) in window (1, 1).
    assert window0[g.window_area + 3 * 33] == 3 * 49 + 4 * 7 + 4


def test_pooled_keys_outside_the_grid_are_masked() -> None:
    g = _geom(14, 21, fw=5)  # 2x3 windows, 5x5 pooled neighbourhood
    index = geometry.key_index(g)
    mask = geometry.key_mask(g)
    pooled = index[g.window_area + g.num_neighbor_keys : g.num_keys]
    pooled_mask = mask[0][g.window_area + g.num_neighbor_keys :]
    assert len(pooled) == len(pooled_mask) == 25
    inside = [k for k, m in zip(pooled, pooled_mask, strict=True) if m == 0.0]
    assert sorted(inside) == [g.num_windows * 49 + i for i in range(6)]  # the 2x3 grid, all reachable from (0, 0)
    masked = [k for k, m in zip(pooled, pooled_mask, strict=True) if m == geometry.MASK_VALUE]
    assert masked == [0] * (25 - 6)  # read window (0, 0)'s first token; their softmax weight is exactly 0
    assert all(v == 0.0 for v in mask[0][: g.window_area + g.num_neighbor_keys])


def test_the_mask_gives_exactly_zero_weight_where_the_official_one_gives_denormals() -> None:
    import torch

    logits = torch.tensor([3.0, -2.0, 0.5])
    official = torch.cat([logits, torch.tensor([geometry.OFFICIAL_MASK_VALUE])]).softmax(-1)
    ours = torch.cat([logits, torch.tensor([geometry.MASK_VALUE])]).softmax(-1)
    assert 0.0 < official[-1].item() < torch.finfo(torch.float32).tiny  # a denormal
    assert ours[-1].item() == 0.0
    assert torch.equal(official[:-1], ours[:-1])


def test_relative_position_index_matches_the_swin_table_layout() -> None:
    index = geometry.relative_position_index(7, 7)
    assert len(index) == 49 * 49
    assert min(index) == 0
    assert max(index) == 13 * 13 - 1
    assert index[0] == 6 * 13 + 6  # same cell: centre of the table


def test_empty_feature_map_is_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        geometry.block_geometry(0, 4, 7, 3, 1, 2, True)
