"""PyTorch reference backend: rebuilds the exported model from the manifest (needs the `export` extra).

Only for checking the other backends: it needs the same weights the export used
(random-init, or the checkpoint file recorded in the manifest). The model is built
and its weights loaded by the export's own task hooks (`export.tasks`), so there is
one place that knows how a task's model is made.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from manifest import RANDOM_INIT, Manifest, sha256_file
from service.backends import BackendUnavailable


class TorchBackend:
    name = "torch"
    device = "cpu"
    precision = "fp32"

    def __init__(self, manifest: Manifest) -> None:
        try:
            import torch

            from export.tasks import get_task
            from export.uint8 import normalise
            from export.weights import seed_random_init
            from focal import FocalConfig
            from focal.checkpoint import read_state_dict
        except ImportError as exc:
            raise BackendUnavailable(f"the torch backend needs the 'export' extra ({exc})") from exc
        self._torch = torch
        task = get_task(manifest.task)
        seed_random_init()
        self.model = task.build(FocalConfig(**manifest.focal_config))
        weights = manifest.weights
        if weights.source != RANDOM_INIT:
            path = Path(weights.path or "")
            if not path.is_file() or sha256_file(path) != weights.sha256:
                raise BackendUnavailable(f"the checkpoint the export used is not at {path} (or differs)")
            task.load_weights(self.model, read_state_dict(path), manifest.weights_role)
        self.max_batch_size = manifest.batch.max
        spec = manifest.preprocess  # an export that normalises in its graph takes uint8: do it here then
        self.normalise: Callable[[np.ndarray], np.ndarray] | None = None
        if spec.normalise == "graph":
            self.normalise = functools.partial(normalise, mean=spec.mean, std=spec.std)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.normalise is not None:
            batch = self.normalise(batch)
        with self._torch.inference_mode():
            out = self.model(self._torch.from_numpy(batch))
        return np.asarray(out.numpy())

    def close(self) -> None:
        pass
