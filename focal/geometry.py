"""Pure index builders for focal self-attention: plain ints in, lists of ints out.

Everything here runs once when a model is built. The forward pass then only
gathers with these constant indices, which is what makes the model export to a
small static ONNX graph with a symbolic batch dimension.

Inside a stage, tokens are kept in *window order*: the zero-padded feature map
(`padded_h x padded_w`) is cut into `w x w` windows, windows in row-major order,
tokens row-major inside each window. Keys are then fetched from one table:

    [ window-order tokens (num_windows * w*w) ; pooled tokens (num_windows) ]

The key order per query window is the official one (see FOCAL_NOTES): the
window's own tokens, the 132-token neighbour ring taken from four cyclic rolls,
then the `fw x fw` pooled windows around the query window.

Masked keys: the official code gives pooled keys outside the pooled grid zero
k/v and an additive -100 mask, so their softmax weight is exp(-100) ~ 4e-44 of
the largest: a denormal float, which contributes nothing representable to the
result but makes x86 CPUs take a slow path (onnxruntime's softmax ran 2x slower,
and the attention matmul after it too). Here the mask is -1e4, whose exp is an
exact 0, and a masked key reads the query window's own first token instead of a
zero row (with weight exactly 0 its value cannot matter). The outputs are the
official ones: the golden fixtures agree to ~3e-7 either way.
"""

from __future__ import annotations

from dataclasses import dataclass

MASK_VALUE = -1e4  # see "Masked keys" above; the official value is -100
OFFICIAL_MASK_VALUE = -100.0


@dataclass(frozen=True)
class BlockGeometry:
    """Static shape facts of one focal attention block at one input size."""

    height: int  # stage feature map, before padding
    width: int
    window: int  # after the official clamp
    expand: int  # neighbour ring width (0: no ring)
    focal_window: int  # pooled-key window (fw x fw pooled tokens)
    pooled: bool  # whether the pooled level is attended to

    @property
    def padded_h(self) -> int:
        return -(-self.height // self.window) * self.window

    @property
    def padded_w(self) -> int:
        return -(-self.width // self.window) * self.window

    @property
    def windows_h(self) -> int:
        return self.padded_h // self.window

    @property
    def windows_w(self) -> int:
        return self.padded_w // self.window

    @property
    def num_windows(self) -> int:
        return self.windows_h * self.windows_w

    @property
    def window_area(self) -> int:
        return self.window * self.window

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def num_neighbor_keys(self) -> int:
        w, e = self.window, self.expand
        return 4 * (w * w - (w - e) * (w - e)) if e > 0 else 0

    @property
    def num_pooled_keys(self) -> int:
        return self.focal_window**2 if self.pooled else 0

    @property
    def num_keys(self) -> int:
        return self.window_area + self.num_neighbor_keys + self.num_pooled_keys

    @property
    def needs_padding(self) -> bool:
        return self.padded_h != self.height or self.padded_w != self.width


def block_geometry(
    height: int,
    width: int,
    window_size: int,
    expand_size: int,
    focal_window: int,
    focal_level: int,
    pooled: bool,
) -> BlockGeometry:
    """Apply the official rules: clamp the window to small maps, decide which key groups exist.

    When the smaller side of the map is <= the window, the window becomes that
    side and the neighbour ring is switched off. The ring also needs
    focal_level > 0, the pooled level focal_level > 1 and a pooling method.
    """
    if height < 1 or width < 1:
        raise ValueError(f"feature map {height}x{width} is empty: the input is too small")
    window, expand = window_size, expand_size
    if min(height, width) <= window_size:
        window, expand = min(height, width), 0
    if focal_level < 1:
        expand = 0
    return BlockGeometry(
        height=height,
        width=width,
        window=window,
        expand=expand,
        focal_window=focal_window,
        pooled=pooled and focal_level > 1,
    )


def _window_order(g: BlockGeometry, row: int, col: int) -> int:
    """Position of padded-map cell (row, col) in window order."""
    w = g.window
    return ((row // w) * g.windows_w + col // w) * g.window_area + (row % w) * w + col % w


def partition_index(g: BlockGeometry) -> list[int]:
    """For each window-order position, the row-major token it reads (num_tokens = zero padding)."""
    index = [0] * (g.num_windows * g.window_area)
    for row in range(g.padded_h):
        for col in range(g.padded_w):
            inside = row < g.height and col < g.width
            index[_window_order(g, row, col)] = row * g.width + col if inside else g.num_tokens
    return index


def unpartition_index(g: BlockGeometry) -> list[int]:
    """For each row-major token of the unpadded map, its window-order position (undo + crop)."""
    return [_window_order(g, row, col) for row in range(g.height) for col in range(g.width)]


def neighbor_offsets(window: int, expand: int) -> list[tuple[int, int]]:
    """(dy, dx) of the neighbour-ring keys relative to the window's top-left cell, in official order.

    The official code rolls k/v by (-e,-e), (-e,+e), (+e,-e), (+e,+e), cuts each
    rolled map into windows and keeps, per roll, the cells outside a fixed
    `(w-e) x (w-e)` corner. The four rolled windows overlap, so 12 cells of the
    13x13 neighbourhood appear twice (132 keys for w=7, e=3).
    """
    w, e = window, expand
    if e <= 0:
        return []
    rolls = [
        # (shift applied to the source position, keep-test on the in-window cell)
        ((e, e), lambda ay, ax: ay >= w - e or ax >= w - e),
        ((e, -e), lambda ay, ax: ay >= w - e or ax < e),
        ((-e, e), lambda ay, ax: ay < e or ax >= w - e),
        ((-e, -e), lambda ay, ax: ay < e or ax < e),
    ]
    offsets = []
    for (sy, sx), keep in rolls:
        for ay in range(w):
            for ax in range(w):
                if keep(ay, ax):
                    offsets.append((ay + sy, ax + sx))
    return offsets


def _pooled_keys(g: BlockGeometry, wy: int, wx: int) -> list[int | None]:
    """Key-table rows of the fw x fw pooled windows around window (wy, wx); None outside the grid."""
    half = g.focal_window // 2
    keys: list[int | None] = []
    for ky in range(g.focal_window):
        for kx in range(g.focal_window):
            py, px = wy - half + ky, wx - half + kx
            inside = 0 <= py < g.windows_h and 0 <= px < g.windows_w
            keys.append(g.num_windows * g.window_area + py * g.windows_w + px if inside else None)
    return keys


def key_index(g: BlockGeometry) -> list[int]:
    """Flat [num_windows * num_keys] indices into the key table (see module docstring)."""
    w = g.window
    ring = neighbor_offsets(w, g.expand)
    index: list[int] = []
    for wy in range(g.windows_h):
        for wx in range(g.windows_w):
            first = (wy * g.windows_w + wx) * g.window_area
            index.extend(range(first, first + g.window_area))
            for dy, dx in ring:  # cyclic wrap-around, as torch.roll does
                row = (wy * w + dy) % g.padded_h
                col = (wx * w + dx) % g.padded_w
                index.append(_window_order(g, row, col))
            if g.pooled:  # masked keys (None) read the window's first token, with weight 0
                index.extend(first if key is None else key for key in _pooled_keys(g, wy, wx))
    return index


def key_mask(g: BlockGeometry, value: float = MASK_VALUE) -> list[list[float]]:
    """[num_windows][num_keys] additive mask: `value` on pooled keys outside the pooled grid."""
    unmasked = [0.0] * (g.window_area + g.num_neighbor_keys)
    return [
        unmasked + ([0.0 if key is not None else value for key in _pooled_keys(g, wy, wx)] if g.pooled else [])
        for wy in range(g.windows_h)
        for wx in range(g.windows_w)
    ]


def relative_position_index(query_window: int, key_window: int) -> list[int]:
    """Flat [qw*qw * kw*kw] index into a ((qw + kw - 1)^2)-entry bias table.

    index = (qy - ky + kw - 1) * (qw + kw - 1) + (qx - kx + kw - 1). With
    key_window == query_window this is the Swin window table; with the focal
    window it is the official `relative_position_index_0`.
    """
    span = query_window + key_window - 1
    return [
        (qy - ky + key_window - 1) * span + (qx - kx + key_window - 1)
        for qy in range(query_window)
        for qx in range(query_window)
        for ky in range(key_window)
        for kx in range(key_window)
    ]
