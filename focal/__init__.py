"""Focal Transformer (Yang et al., NeurIPS 2021) built on static window gathers.

>>> from focal import create_model
>>> model = create_model("focal_tiny", checkpoint="focal-tiny-is224-ws7.pth", img_size=384)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from focal.checkpoint import (
    CheckpointAdaptationWarning,
    CheckpointError,
    LoadReport,
    load_checkpoint,
    read_state_dict,
)
from focal.config import VARIANTS, FocalConfig, Variant, get_variant, variant_names
from focal.labels import imagenet1k_labels
from focal.model import FocalTransformer

__all__ = [
    "VARIANTS",
    "CheckpointAdaptationWarning",
    "CheckpointError",
    "FocalConfig",
    "FocalTransformer",
    "LoadReport",
    "Variant",
    "create_model",
    "get_variant",
    "imagenet1k_labels",
    "load_checkpoint",
    "read_state_dict",
    "variant_names",
]


def create_model(variant: str, checkpoint: str | Path | None = None, **overrides: Any) -> FocalTransformer:
    """Build a named variant; keyword arguments override its config (e.g. img_size=384).

    With `checkpoint`, the weights are loaded (and adapted to the size) as by `load_checkpoint`.
    The model is returned in eval mode.
    """
    model = FocalTransformer(get_variant(variant).config(**overrides))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()
