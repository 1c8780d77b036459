"""A served model and its lifecycle: load, warm up, serve, probe while failing, close.

`check_model_folder` reads and checks an export folder cheaply (at start-up, before
anything loads); `ServedModel.load` builds its backend, batcher and transform;
`warm_up` runs the batch sizes the batcher will use; when the model's health turns
*failing* (`service.health`) it probes itself with synthetic batches, with backoff,
until a batch succeeds; `close` drains its queue and frees the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from manifest import Manifest, ManifestError, read_manifest
from service.backends import Backend, load_backend
from service.batcher import BackendError, DeadlineExceeded, Draining, DynamicBatcher, QueueFull
from service.health import HealthPolicy, ModelHealth, Phase
from service.metrics import Metrics, ModelObserver
from service.settings import Settings, usable_cores
from service.tasks import TASKS, ServiceTask, Transform

log = logging.getLogger("focal.service")


class ModelLoadError(Exception):
    """An export folder cannot be served (the message says why)."""


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ModelFolder:
    """An export folder that passed the start-up checks, and the name it is served under."""

    folder: Path
    manifest: Manifest
    labels: list[str]
    name: str

    @property
    def version(self) -> str:
        return self.manifest.model_version


def default_model_name(manifest: Manifest) -> str:
    """The variant for a classifier (`focal_tiny`); a detector adds its architecture (`focal_tiny_retinanet`)."""
    return manifest.variant if manifest.task == "classify" else f"{manifest.variant}_retinanet"


def split_model_spec(spec: str | Path) -> tuple[str | None, Path]:
    """`NAME=DIR` -> (NAME, DIR); a plain `DIR` -> (None, DIR): the name then comes from the manifest."""
    text = str(spec)
    name, sep, rest = text.partition("=")
    if sep and not Path(text).exists():  # a folder whose name holds "=" is still a folder
        return name, Path(rest)
    return None, Path(text)


def check_model_folder(folder: Path, name: str | None = None) -> ModelFolder:
    """The folder's manifest and labels, if it can be served; otherwise `ModelLoadError` saying why.

    Cheap (no hashing): run at start-up for every folder, before anything is loaded, and before a
    repository load. `name`: what to serve it as (default: `default_model_name`)."""
    if name is not None and not MODEL_NAME.match(name):
        raise ModelLoadError(
            f"model name {name!r}: use 1-64 letters, digits, '_', '.' or '-' (a letter or digit first)"
        )
    try:
        manifest = read_manifest(folder)
    except ManifestError as exc:
        raise ModelLoadError(str(exc)) from None
    for file in (*manifest.onnx_names, manifest.labels):
        if not (folder / file).is_file():
            raise ModelLoadError(f"{folder}: {file} is missing")
    labels = (folder / manifest.labels).read_text().splitlines()
    if len(labels) != manifest.num_classes:
        raise ModelLoadError(f"{folder}: {len(labels)} labels for {manifest.num_classes} classes")
    return ModelFolder(folder, manifest, labels, name or default_model_name(manifest))


def check_model_folders(specs: list[Path]) -> list[ModelFolder]:
    """Fail fast on folders that cannot be served (before anything is loaded). Each spec is `DIR` or
    `NAME=DIR`; names must differ."""
    if not specs:
        raise ModelLoadError("no model given: pass --model DIR (or FOCAL_MODELS=DIR), a python -m export output folder")
    checked: list[ModelFolder] = []
    for spec in specs:
        name, folder = split_model_spec(spec)
        model = check_model_folder(folder, name)
        same = [c.folder for c in checked if c.name == model.name]
        if same:
            raise ModelLoadError(
                f"{folder} and {same[0]} would both be served as {model.name!r}; name one with --model NAME=DIR"
            )
        checked.append(model)
    return checked


BackendLoader = Callable[[ModelFolder, Settings], Backend]


def default_backend(checked: ModelFolder, settings: Settings) -> Backend:
    """The backend the settings and the machine call for (`service.backends.load_backend`)."""
    return load_backend(
        checked.folder, checked.manifest, settings.backend, settings.intra_op_threads, settings.intra_op_spinning
    )


class _BatchEvents:
    """What the batcher reports goes to the metrics and to the model's health."""

    def __init__(self, metrics: ModelObserver, model: ServedModel, part: str = "") -> None:
        self.metrics, self.model, self.part = metrics, model, part  # part: the canvas, of several

    def queue_depth(self, depth: int) -> None:
        self.metrics.queue_depth(sum(b.queue_depth for b in self.model.batchers))  # every canvas's queue

    def batch_done(
        self, size: int, queue_waits: list[float], seconds: float, error: str | None, sources: int = 1
    ) -> None:
        self.metrics.batch_done(size, queue_waits, seconds, error, sources)
        self.model.batch_done(error, self.part)

    def dropped(self, reason: str) -> None:
        self.metrics.dropped(reason)


class Batcher(Protocol):
    """What a request uses of a model's batcher: `DynamicBatcher` in this process, or
    `service.remote.RemoteBatcher`, which reaches the one in the model host process."""

    max_batch_size: int
    max_queue_delay_s: float

    @property
    def alive(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    def busy_for(self) -> float: ...

    async def submit(self, sample: np.ndarray, timeout_s: float) -> np.ndarray: ...


class ShapeRouter:
    """The `Batcher` of a model with several input shapes (a detector's canvases): one batcher per
    shape, each sample to the batcher of its shape, so every batch holds one canvas."""

    def __init__(self, batchers: dict[tuple[int, ...], DynamicBatcher]) -> None:
        self.batchers = batchers
        first = next(iter(batchers.values()))
        self.max_batch_size, self.max_queue_delay_s = first.max_batch_size, first.max_queue_delay_s

    @property
    def alive(self) -> bool:
        return all(b.alive for b in self.batchers.values())

    @property
    def queue_depth(self) -> int:
        return sum(b.queue_depth for b in self.batchers.values())

    def busy_for(self) -> float:
        return max(b.busy_for() for b in self.batchers.values())

    async def submit(self, sample: np.ndarray, timeout_s: float, source: str = "") -> np.ndarray:
        batcher = self.batchers.get(tuple(sample.shape))
        if batcher is None:  # the protocols check shapes first: this is a caller's bug
            raise ValueError(f"no input of shape {list(sample.shape)}; the model takes {list(self.batchers)}")
        return await batcher.submit(sample, timeout_s, source)


class Model:
    """What requests use of a served model, wherever it runs: its manifest, labels, task and transform,
    its health and its batcher. `ServedModel` runs here; `service.remote.RemoteModel` in the model host."""

    def __init__(self, checked: ModelFolder, health: ModelHealth, batcher: Batcher) -> None:
        self.name, self.version, self.folder = checked.name, checked.version, checked.folder
        self.manifest, self.labels = checked.manifest, checked.labels
        self.task: ServiceTask = TASKS[checked.manifest.task]
        self.transform: Transform = self.task.transform(checked.manifest)
        self.health, self.batcher = health, batcher
        # One manifest per input size (a detector's canvases), as if each were the only one.
        self.views: list[Manifest] = checked.manifest.canvas_views()
        self.input_shapes = [tuple(view.input.sample_shape) for view in self.views]
        self.warmup_seconds: float | None = None
        self.leases = 0  # requests using this model now (a replaced model closes when the last one ends)

    @property
    def random_init(self) -> bool:
        return self.manifest.random_init

    def info(self) -> dict[str, Any]:
        """What /v1/models and every response say about the model."""
        raise NotImplementedError

    @contextlib.contextmanager
    def lease(self) -> Iterator[Model]:
        """Held by a request from the moment it picks this model until it is answered, so a model
        replaced or unloaded meanwhile finishes that request before it closes (`retire`)."""
        self.leases += 1
        try:
            yield self
        finally:
            self.leases -= 1

    async def close(self, drain_timeout_s: float) -> None:
        raise NotImplementedError


class ServedModel(Model):
    """A model whose backends and batchers run in this process: one of each per input size."""

    batcher: DynamicBatcher | ShapeRouter

    def __init__(
        self,
        checked: ModelFolder,
        backends: list[Backend],
        settings: Settings,
        metrics: Metrics,
        health: ModelHealth,
    ) -> None:
        observer = metrics.observer(checked.name)
        views = checked.manifest.canvas_views()
        # On a CPU a run uses every core (unless FOCAL_INTRA_OP_THREADS leaves room for all canvases at once):
        # a model's canvases take turns rather than fight over the cores.
        threads = settings.intra_op_threads or usable_cores()
        cpu_bound = backends[0].device == "cpu" and threads * len(backends) > usable_cores()
        turns = asyncio.Lock() if len(backends) > 1 and cpu_bound else None
        self.batchers = [
            DynamicBatcher(
                backend.infer,
                max_batch_size=min(settings.max_batch_size or backend.max_batch_size, backend.max_batch_size),
                max_queue_delay_s=settings.queue_delay_ms(backend.device) / 1000,
                max_queue_size=settings.max_queue_size,
                observer=_BatchEvents(observer, self, "" if len(backends) == 1 else _size(view)),
                name=checked.name if len(backends) == 1 else f"{checked.name}-{_size(view)}",
                turns=turns,
            )
            for view, backend in zip(views, backends, strict=True)
        ]
        router: dict[tuple[int, ...], DynamicBatcher] = {
            tuple(v.input.sample_shape): b for v, b in zip(views, self.batchers, strict=True)
        }
        super().__init__(checked, health, self.batchers[0] if len(self.batchers) == 1 else ShapeRouter(router))
        self.backends, self.settings, self.metrics = backends, settings, metrics
        self._probing: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def backend(self) -> Backend:
        """The first input size's backend (every size's runs the same way)."""
        return self.backends[0]

    @classmethod
    def load(
        cls,
        checked: ModelFolder,
        settings: Settings,
        metrics: Metrics,
        health: ModelHealth,
        backends: BackendLoader | None = None,
    ) -> ServedModel:
        """Build a backend per input size (slow: run it off the event loop)."""
        loader = backends or default_backend
        built = _load_each_canvas(checked, settings, loader)
        if _mixed(built) and settings.backend == "auto":  # TensorRT loaded for some canvases only
            log.warning(
                "%s: its canvases would run on different backends (%s); all run on onnxruntime",
                checked.name,
                _kinds(checked, built),
            )
            for backend in built:
                backend.close()
            built = _load_each_canvas(checked, settings.model_copy(update={"backend": "onnxruntime"}), loader)
        if _mixed(built):
            kinds = _kinds(checked, built)
            for backend in built:
                backend.close()
            raise ModelLoadError(f"{checked.folder}: its canvases load on different backends or devices ({kinds})")
        return cls(checked, built, settings, metrics, health)

    def info(self) -> dict[str, Any]:
        m = self.manifest
        facts = {
            "name": self.name,
            "version": self.version,
            "variant": m.variant,
            "task": m.task,
            "input_size": list(m.input_size),
            "num_classes": m.num_classes,
            "precision": self.backend.precision,  # what runs (an fp16 export runs its fp32 graph on a CPU)
            "backend": self.backend.name,
            "device": self.backend.device,
            "max_batch_size": self.batcher.max_batch_size,
            "max_queue_delay_ms": self.batcher.max_queue_delay_s * 1000,
            "batch": m.batch.model_dump(),
            "weights": m.weights.source,
            "weights_sha256": m.weights.sha256,
            "weights_role": m.weights_role,
            "random_init": m.random_init,
        }
        if m.task == "detect":
            facts["canvases"] = [list(c) for c in m.canvas_sizes]
        return facts

    def synthetic_batch(self, size: int, view: Manifest | None = None) -> np.ndarray:
        """The mean image in the input's shape and type (warm-up and probes; `view`: one input size's
        manifest, default the first): zeros after normalisation, or the mean colour's uint8 pixels for a
        graph that normalises."""
        view = view or self.manifest
        spec, preprocess = view.input, view.preprocess
        if spec.dtype != "uint8":
            return np.zeros((size, *spec.sample_shape), dtype=np.float32)
        colour = np.round(np.asarray(preprocess.mean) * 255).astype(np.uint8).reshape(3, 1, 1)
        return np.ascontiguousarray(np.broadcast_to(colour, (size, *spec.sample_shape)))

    # -- lifecycle ---------------------------------------------------------------------------
    async def warm_up(self) -> None:
        """Run the batch sizes the batcher will produce most (1, the profile's opt, the max) once each,
        at every input size."""
        self.health.warming_up()
        top = self.batcher.max_batch_size
        sizes = sorted({1, min(self.manifest.batch.opt, top), top})
        start = time.perf_counter()
        for view, batcher in zip(self.views, self.batchers, strict=True):
            for size in sizes:  # on the batch thread, so close() sees a warm-up still running
                await batcher.run_alone(self.synthetic_batch(size, view))
        self.warmup_seconds = time.perf_counter() - start
        for batcher in self.batchers:
            batcher.start()
        self.health.warmed_up()
        shapes = f" at {len(self.views)} canvases" if len(self.views) > 1 else ""
        log.info("warmed up %s at batch sizes %s%s in %.1f s", self.name, sizes, shapes, self.warmup_seconds)

    def batch_done(self, error: str | None, part: str = "") -> None:
        if self._closing:
            return
        if self.health.batch_done(error, part) and (self._probing is None or self._probing.done()):
            log.error(
                "%s: %d batches in a row failed (%s): not ready; probing to recover",
                self.name,
                self.health.consecutive_failures,
                error,
            )
            self._probing = asyncio.get_running_loop().create_task(self._probe(), name=f"probe-{self.name}")

    async def _probe(self) -> None:
        """Synthetic batches through the batcher, at doubling waits, until the model is ready again: one
        per input size (a detector's canvases each have a backend; the failing one must succeed)."""
        wait = self.settings.probe_backoff_s
        while self.health.phase is Phase.FAILING:
            await asyncio.sleep(wait)
            if self.health.phase is not Phase.FAILING:
                break  # a request's batch succeeded meanwhile
            try:
                for view in self.views:
                    await self.batcher.submit(self.synthetic_batch(1, view)[0], self.settings.request_timeout_s)
            except Draining:
                return
            except (BackendError, DeadlineExceeded, QueueFull) as exc:
                self.metrics.probes.labels(self.name, "failed").inc()
                wait = min(2 * wait, self.settings.probe_backoff_max_s)
                log.warning("%s: probe failed (%s); next in %g s", self.name, exc, wait)
                continue
            self.metrics.probes.labels(self.name, "recovered").inc()
        log.info("%s recovered: ready again", self.name)

    async def retire(self, drain_timeout_s: float) -> None:
        """Close a model that new requests no longer reach (replaced or unloaded): wait for the
        requests that hold it (up to the timeout), then `close`."""
        end = time.monotonic() + drain_timeout_s
        for batcher in self.batchers:
            batcher.closed_reason = f"{self.name} version {self.version} was replaced or unloaded; retry"
        while self.leases and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self.leases:
            log.warning(
                "%s: %d requests still running after %g s; closing anyway", self.name, self.leases, drain_timeout_s
            )
        await self.close(max(0.0, end - time.monotonic()))
        log.info("closed %s version %s", self.name, self.version)

    async def close(self, drain_timeout_s: float) -> None:
        """Finish queued work (up to the timeout), stop the batchers and the probes, free the backends."""
        drained = await asyncio.gather(*(batcher.drain(drain_timeout_s) for batcher in self.batchers))
        if not all(drained):
            log.warning("%s: queued work not finished within the drain timeout", self.name)
        self._closing = True  # from here no batch outcome starts a probe
        for batcher in self.batchers:
            await batcher.stop()
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing
        for batcher, backend in zip(self.batchers, self.backends, strict=True):
            if batcher.backend_running:  # a warm-up or a stuck call still uses it: freeing it could crash
                log.warning("%s: a batch is still running; its backend is left to the process exit", self.name)
            else:
                backend.close()


def _size(view: Manifest) -> str:
    return f"{view.input_size[0]}x{view.input_size[1]}"


def _mixed(backends: list[Backend]) -> bool:
    return len({(b.name, b.device) for b in backends}) > 1


def _kinds(checked: ModelFolder, backends: list[Backend]) -> str:
    views = checked.manifest.canvas_views()
    return ", ".join(f"{_size(v)}: {b.name} on {b.device}" for v, b in zip(views, backends, strict=True))


def _load_each_canvas(checked: ModelFolder, settings: Settings, loader: BackendLoader) -> list[Backend]:
    built: list[Backend] = []
    try:
        for view in checked.manifest.canvas_views():
            built.append(loader(dataclasses.replace(checked, manifest=view), settings))
    except BaseException:
        for backend in built:
            backend.close()
        raise
    return built


def health_policy(settings: Settings) -> HealthPolicy:
    return HealthPolicy(settings.failing_after_batches, settings.unhealthy_after_s, settings.stuck_batch_s)
