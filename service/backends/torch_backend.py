"""PyTorch reference backend: rebuilds the exported model from the manifest (needs the `torch` extra).

Only for checking the other backends: it needs the same weights the export
used (random-init, or the checkpoint file recorded in the manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.backends import BackendUnavailable


class TorchBackend:
    name = "torch"
    device = "cpu"
    precision = "fp32"

    def __init__(self, manifest: dict[str, Any]) -> None:
        try:
            import torch

            from export.weights import RANDOM_INIT, seed_random_init, sha256_file
            from focal import FocalConfig, FocalTransformer, load_checkpoint
            from focal.detection import (
                FocalRetinaNet,
                RetinaNetConfig,
                load_backbone_weights,
                load_detection_checkpoint,
            )
        except ImportError as exc:
            raise BackendUnavailable(f"the torch backend needs the 'torch' extra ({exc})") from exc
        self._torch = torch
        weights = manifest["weights"]
        config = FocalConfig(**manifest["model_config"])
        seed_random_init()
        detect = manifest["task"] == "detect"
        self.model = (
            FocalRetinaNet(config, RetinaNetConfig(num_classes=int(manifest["num_classes"])))
            if detect
            else FocalTransformer(config)
        ).eval()
        if weights["source"] != RANDOM_INIT:
            path = Path(weights.get("path") or "")
            if not path.is_file() or sha256_file(path) != weights["sha256"]:
                raise BackendUnavailable(f"the checkpoint the export used is not at {path} (or differs)")
            if isinstance(self.model, FocalRetinaNet):
                load = (
                    load_backbone_weights if manifest.get("weights_role") == "backbone" else load_detection_checkpoint
                )
                load(self.model, path)
            else:
                load_checkpoint(self.model, path)
        self.max_batch_size = int(manifest["batch"]["max"])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model(self._torch.from_numpy(batch))
        return np.asarray(out.numpy())
