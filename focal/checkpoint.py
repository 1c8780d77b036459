"""Reading official checkpoints safely and fitting them to a model.

- `read_state_dict(path)`: `.pth` (`{'model': ...}`, `{'state_dict': ...}` or a
  bare state dict) through `torch.load(weights_only=True)`, or `.safetensors`.
  A pickle that would need to run code is refused; no code ever runs.
- `adapt_state_dict(state_dict, model)`: one pure function that maps official
  key/shape conventions onto a model built for any input size: drops the int64
  index buffers the official files carry (after checking them), resizes bias
  tables and pool layers whose window was clamped differently, creates the
  stage-4 neighbour table a 224 checkpoint lacks, and drops a head of another
  class count. Every change is reported as a `CheckpointAdaptationWarning`.
  Focal-fast (v2): the checkpoint's top-K index buffers are kept (they define the
  model, see `focal.topk`) once checked to be valid selections; its coordinate
  buffers are checked against them and dropped (they are derived); a file made at
  another size, or without index buffers, gets the official rule's selection, with
  a warning.
- `load_checkpoint(model, path)`: read + adapt + strict load; any remaining
  mismatch raises `CheckpointError` listing missing keys, unexpected keys and
  shape mismatches.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focal import geometry, topk
from focal.config import FocalConfig
from focal.model import FocalFastAttention, FocalWindowAttention

# int64 index buffers of the official model; ours are computed at build time.
_INDEX_BUFFER = re.compile(r"(^|\.)(relative_position_index(_\d+)?|valid_ind_rolled|valid_ind_unfold_\d+|attn_mask)$")
_WINDOW_TABLE = re.compile(r"\.attn\.relative_position_bias_table$")
_POOLED_TABLE = re.compile(r"\.attn\.relative_position_bias_table_to_windows\.\d+$")
_NEIGHBOR_TABLE = re.compile(r"\.attn\.relative_position_bias_table_to_neighbors$")
_POOL_WEIGHT = re.compile(r"\.pool_layers\.\d+\.weight$")


class CheckpointError(Exception):
    """A checkpoint could not be read, or does not fit the model."""


class CheckpointAdaptationWarning(UserWarning):
    """A checkpoint was changed to fit the model (resized, zero-filled or dropped tensors)."""


@dataclass
class LoadReport:
    source: str
    adaptations: list[str] = field(default_factory=list)
    ignored_buffers: int = 0


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict, never executing code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise CheckpointError("reading .safetensors needs the 'safetensors' package") from exc
        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files; all mean "unreadable"
        code = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and code:
            raise CheckpointError(
                f"{path}: refused to load: the file would have to import and run {code.group(1)!r}; "
                "checkpoints are loaded with weights_only=True and never execute code"
            ) from exc
        reason = _first_line(exc)
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated, another kind of file, or a pickle "
            f"that weights-only loading does not accept): {reason}"
        ) from exc
    return unwrap_state_dict(obj, str(path))


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "error" in line.lower() and "Weights only" not in line), None)
    return f"{type(exc).__name__}: {detail or (lines[0] if lines else '')}"[:300]


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """Accept `{'model': sd}` (official), `{'state_dict': sd}` (mmdetection) or a bare state dict."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: holds no state dict (expected a mapping of tensors)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: entries that are not tensors: {', '.join(map(str, not_tensors[:5]))}")
    return {str(k): v for k, v in obj.items()}


def _resize_table(table: Tensor, target: torch.Size, heads_first: bool) -> Tensor:
    """Bicubic resize of a square relative-position table, as timm does for Swin."""
    t = table if heads_first else table.t()  # [heads, side*side]
    heads, n = t.shape
    src, dst = round(n**0.5), round((target[1] if heads_first else target[0]) ** 0.5)
    grid = t.reshape(1, heads, src, src).float()
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    out = out.reshape(heads, dst * dst).to(table.dtype)
    return out if heads_first else out.t().contiguous()


def _resize_pool_weight(weight: Tensor, target: torch.Size) -> Tensor:
    """Resize a `Linear(w*w, 1)` pooling kernel to another window, keeping its total weight."""
    src, dst = round(weight.shape[1] ** 0.5), round(target[1] ** 0.5)
    grid = weight.reshape(1, 1, src, src).float()
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    out = out * (grid.sum() / out.sum()) if float(out.sum()) != 0.0 else out
    return out.reshape(1, dst * dst).to(weight.dtype)


def _check_index_buffer(key: str, value: Tensor, attentions: Mapping[str, FocalWindowAttention]) -> str | None:
    """Compare an official index buffer with the one our geometry implies; a note if they differ."""
    prefix, _, name = key.rpartition(".")
    attn = attentions.get(prefix)
    if attn is None:
        return None
    g = attn.geom
    if name == "relative_position_index":
        expected = geometry.relative_position_index(g.window, g.window)
    elif name == "relative_position_index_0" and g.pooled:
        expected = geometry.relative_position_index(g.window, g.focal_window)
    else:
        return None
    if value.numel() != len(expected):
        return None  # made for another window; the tables it indexes are resized separately
    if value.flatten().tolist() == expected:
        return None
    return f"{key}: the checkpoint's index buffer differs from this model's layout (shape {tuple(value.shape)})"


def adapt_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], list[str], int]:
    """Fit an official-layout state dict to `model`. Returns (state dict, adaptation notes, buffers dropped).

    Pure: reads the model's expected keys and shapes, changes nothing in place.
    Keys that fit neither way are passed through so the strict load reports them.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    attentions = {name: m for name, m in model.named_modules() if isinstance(m, FocalWindowAttention)}
    out: dict[str, Tensor] = {}
    notes: list[str] = []
    keep_initialised: set[str] = set()  # model keys that keep the model's own initialisation
    classifier_keys: list[str] = []  # head/final norm of a classifier checkpoint, for a backbone
    features_only = bool(getattr(getattr(model, "config", None), "features_only", False))

    fast = {name: m for name, m in model.named_modules() if isinstance(m, FocalFastAttention)}
    handled = _adapt_topk_buffers(state_dict, fast, expected, out, notes)
    dropped = len(handled - out.keys())

    for key, value in state_dict.items():
        if key in handled:
            continue
        if _INDEX_BUFFER.search(key):
            dropped += 1
            note = _check_index_buffer(key, value, attentions)
            if note:
                notes.append(note)
            continue
        if features_only and (key.startswith("head.") or key.startswith("norm.")):
            classifier_keys.append(key)
            continue
        if key not in expected:
            if _NEIGHBOR_TABLE.search(key) and key.rsplit(".", 1)[0] in attentions:
                notes.append(f"{key}: dropped (no neighbour keys at this input size: the window is clamped)")
                continue
            out[key] = value
            continue
        target = expected[key]
        if value.shape == target:
            out[key] = value
        elif key.startswith("head.") and value.shape[0] != target[0] and value.shape[1:] == target[1:]:
            keep_initialised.add(key)
            if key == "head.weight":
                notes.append(
                    f"head: dropped (checkpoint has {value.shape[0]} classes, model has {target[0]}); "
                    "the head keeps its fresh initialisation"
                )
        elif _WINDOW_TABLE.search(key) and value.shape[1] == target[1]:
            out[key] = _resize_table(value, target, heads_first=False)
            notes.append(f"{key}: resized {tuple(value.shape)} -> {tuple(target)} (bicubic; window changed)")
        elif _POOLED_TABLE.search(key) and value.shape[0] == target[0]:
            out[key] = _resize_table(value, target, heads_first=True)
            notes.append(f"{key}: resized {tuple(value.shape)} -> {tuple(target)} (bicubic; window changed)")
        elif _POOL_WEIGHT.search(key) and value.shape[0] == target[0] == 1:
            out[key] = _resize_pool_weight(value, target)
            notes.append(
                f"{key}: resized {tuple(value.shape)} -> {tuple(target)} (bicubic, total weight kept; window changed)"
            )
        else:
            out[key] = value  # a real mismatch: left for the strict check to report

    current = model.state_dict()
    for key in sorted(set(expected) - out.keys()):
        if _NEIGHBOR_TABLE.search(key) and key not in state_dict:
            out[key] = torch.zeros(expected[key])
            notes.append(
                f"{key}: initialised to zeros (the checkpoint was made at a size where this block "
                "had no neighbour keys)"
            )
        elif features_only and re.fullmatch(r"norm\d+\.(weight|bias)", key) and key not in state_dict:
            keep_initialised.add(key)
        if key in keep_initialised:
            out[key] = current[key]
    if classifier_keys:
        notes.append(
            f"{', '.join(sorted(classifier_keys))}: dropped (classifier weights; this model is a feature backbone)"
        )
    stage_norms = sorted(k for k in keep_initialised if not k.startswith("head."))
    if stage_norms:
        notes.append(
            f"{', '.join(stage_norms)}: not in the checkpoint; kept at their initialisation (weight 1, bias 0)"
        )
    return out, notes, dropped


def _adapt_topk_buffers(
    state_dict: Mapping[str, Tensor],
    fast: Mapping[str, FocalFastAttention],
    expected: Mapping[str, torch.Size],
    out: dict[str, Tensor],
    notes: list[str],
) -> set[str]:
    """Focal-fast's buffers: the checkpoint's selections into `out` (checked), or the official rule's where
    it has none for this size; coordinates and window offsets checked and dropped. Returns the checkpoint
    keys handled here."""
    handled: set[str] = set()
    for prefix, attn in fast.items():
        g = attn.topk_geom
        offsets_key = f"{prefix}.window_coords"
        offsets = state_dict.get(offsets_key)
        if offsets is not None:
            handled.add(offsets_key)  # read by the official forward, never used: checked when it fits
            a, b = torch.meshgrid(torch.arange(g.window), torch.arange(g.window), indexing="ij")
            wanted = torch.stack([a, b], dim=-1) - g.window // 2
            if offsets.shape == wanted.shape and not torch.equal(offsets.long(), wanted):
                raise CheckpointError(f"{offsets_key}: not the in-window offsets (a - ws//2, b - ws//2)")
        for level in range(len(g.level_keys)):
            key = f"{prefix}.topk_cloest_indice_{level}"
            coords_key = f"{prefix}.topk_cloest_coords_{level}"
            handled.update(k for k in (key, coords_key) if k in state_dict)
            value = state_dict.get(key)
            made = None
            if value is None:
                made = "has none"
            elif tuple(value.shape) != tuple(expected[key]):
                made = f"was made for another size or focal_topK {tuple(value.shape)}"
            else:
                problem = topk.selection_problem(value, g, level)
                transposed = dataclasses.replace(g, height=g.width, width=g.height)
                if problem and topk.selection_problem(value, transposed, level) is None:
                    made = f"was made for the transposed size ({g.width}x{g.height} stage map)"
                elif problem:
                    raise CheckpointError(
                        f"{key}: not a valid top-K selection for a {g.height}x{g.width} stage map: {problem} "
                        "(a file made at another size with the same number of windows is refused too: export "
                        "at the size it was made for, or drop its topk_cloest_* buffers to derive them)"
                    )
            if made is not None:
                out[key] = topk.official_selection(g, level)
                what = "tokens" if level == 0 else "pooled windows"
                notes.append(
                    f"{key}: the checkpoint {made}; each window's {g.level_keys[level]} nearest {what} are chosen "
                    "by the official rule (torch.topk), which may keep other tie members than training did"
                )
                continue
            assert value is not None
            out[key] = value.long()
            coords = state_dict.get(coords_key)
            if coords is not None and not torch.equal(coords.float().cpu(), topk.coordinates(value, g, level)):
                raise CheckpointError(
                    f"{coords_key}: does not match the coordinates of {key} (query token minus key position); "
                    "the file is inconsistent"
                )
    return handled


def check_fits(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: does not fit this model"]
        config = getattr(getattr(model, "backbone", model), "config", None)
        if isinstance(config, FocalConfig):
            lines[0] += (
                f" (embed_dim={config.embed_dim}, depths={list(config.depths)}, "
                f"use_conv_embed={config.use_conv_embed}); is it a checkpoint of another variant?"
            )
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in shown)
        raise CheckpointError("\n".join(lines))


def load_checkpoint(model: nn.Module, checkpoint: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Load an official checkpoint (path or state dict) into `model`, adapting it where needed."""
    if isinstance(checkpoint, Mapping):
        source, raw = "state dict", unwrap_state_dict(checkpoint)
    else:
        source, raw = str(checkpoint), read_state_dict(checkpoint)
    state_dict, notes, dropped = adapt_state_dict(raw, model)
    check_fits(model, state_dict, source)
    for note in notes:
        warnings.warn(f"{source}: {note}", CheckpointAdaptationWarning, stacklevel=2)
    model.load_state_dict(state_dict, strict=True)
    return LoadReport(source=source, adaptations=notes, ignored_buffers=dropped)
