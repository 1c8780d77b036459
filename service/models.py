"""A served model: its manifest, labels, preprocessing, backend and batcher."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from service.backends import Backend, load_backend
from service.batcher import DynamicBatcher
from service.detection import DetectionSettings
from service.images import Letterbox, Preprocess, preprocess_spec
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("focal.service")

# Default wait for more images after the first, on GPU backends (where a bigger batch costs
# little more than a small one). On the CPU it is 0: see Settings.max_queue_delay_ms.
GPU_QUEUE_DELAY_MS = 5.0
SERVABLE_TASKS = ("classify", "detect")


class ModelLoadError(Exception):
    """An export folder cannot be served (the message says why)."""


@dataclass
class ServedModel:
    name: str
    folder: Path
    manifest: dict[str, Any]
    labels: list[str]
    preprocess: Preprocess | Letterbox
    backend: Backend
    batcher: DynamicBatcher
    detection: DetectionSettings | None  # detect exports: the test settings NMS runs with
    ready: bool = False
    warmup_seconds: float | None = None
    failed: str | None = field(default=None)

    @property
    def task(self) -> str:
        return str(self.manifest["task"])

    @property
    def random_init(self) -> bool:
        return bool(self.manifest.get("random_init"))

    def info(self) -> dict[str, Any]:
        """What /v1/models and every response say about the model."""
        m = self.manifest
        return {
            "name": self.name,
            "variant": m["variant"],
            "task": m["task"],
            "input_size": m["input_size"],
            "num_classes": m["num_classes"],
            "precision": self.backend.precision,  # what runs (an fp16 export runs its fp32 graph on a CPU)
            "backend": self.backend.name,
            "device": self.backend.device,
            "max_batch_size": self.batcher.max_batch_size,
            "max_queue_delay_ms": self.batcher.max_queue_delay_s * 1000,
            "batch": m["batch"],
            "weights": m["weights"].get("source"),
            "weights_sha256": m["weights"].get("sha256"),
            "weights_role": m.get("weights_role", "classifier" if m["task"] == "classify" else "detector"),
            "random_init": self.random_init,
        }


def check_manifest(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """The folder's manifest and labels, if it can be served; otherwise `ModelLoadError` saying why.

    Cheap (no hashing): run at start-up for every folder, before anything is loaded."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise ModelLoadError(f"{folder}: no readable {MANIFEST_NAME} (is it a python -m export output folder?)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{folder}: manifest format {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    task = manifest.get("task")
    if task not in SERVABLE_TASKS:
        raise ModelLoadError(f"{folder}: task {task!r} cannot be served (only {', '.join(SERVABLE_TASKS)})")
    if task == "detect" and (
        manifest.get("preprocess", {}).get("resize") != "letterbox" or "detection" not in manifest
    ):
        raise ModelLoadError(f"{folder}: a detect manifest needs a letterbox preprocess and a detection block")
    for key in ("onnx", "onnx_fp32", "labels"):
        if not (folder / str(manifest.get(key))).is_file():
            raise ModelLoadError(f"{folder}: {manifest.get(key)} ({key}) is missing")
    labels = (folder / manifest["labels"]).read_text().splitlines()
    if len(labels) != manifest["num_classes"]:
        raise ModelLoadError(f"{folder}: {len(labels)} labels for {manifest['num_classes']} classes")
    return manifest, labels


def load_model(folder: Path, settings: Settings, metrics: Metrics) -> ServedModel:
    manifest, labels = check_manifest(folder)
    backend = load_backend(folder, manifest, settings.backend, settings.intra_op_threads)
    name = f"{manifest['variant']}-{manifest['task']}"
    max_batch = min(settings.max_batch_size or backend.max_batch_size, backend.max_batch_size)
    delay_ms = settings.max_queue_delay_ms
    if delay_ms is None:
        delay_ms = 0.0 if backend.device == "cpu" else GPU_QUEUE_DELAY_MS
    batcher = DynamicBatcher(
        backend.infer,
        max_batch_size=max_batch,
        max_queue_delay_s=delay_ms / 1000,
        max_queue_size=settings.max_queue_size,
        observer=metrics.observer(name),
        name=name,
    )
    detection = DetectionSettings.from_manifest(manifest["detection"]) if manifest["task"] == "detect" else None
    spec = preprocess_spec(manifest["preprocess"])
    return ServedModel(name, folder, manifest, labels, spec, backend, batcher, detection)


async def warm_up(model: ServedModel) -> None:
    """Run the batch sizes the batcher will produce most (1, the profile's opt, the max) once each."""
    h, w = model.manifest["input_size"]
    sizes = sorted(
        {1, min(int(model.manifest["batch"]["opt"]), model.batcher.max_batch_size), model.batcher.max_batch_size}
    )
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    for size in sizes:
        await loop.run_in_executor(None, model.backend.infer, np.zeros((size, 3, h, w), dtype=np.float32))
    model.warmup_seconds = time.perf_counter() - start
    log.info("warmed up %s at batch sizes %s in %.1f s", model.name, sizes, model.warmup_seconds)
