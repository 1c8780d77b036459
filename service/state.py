"""What the routes share, on `app.state.service`: settings, metrics, the thread pool, the models
(planned at start-up, served once loaded, replaced or unloaded through the model repository
API), which model a request gets, and the server's readiness and liveness."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service import errors
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.models import BackendLoader, Model, ModelFolder

log = logging.getLogger("focal.service")


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    preprocess_pool: ThreadPoolExecutor
    planned: list[ModelFolder]  # checked at start-up, in load order
    backends: BackendLoader | None = None  # builds a model's backend (None: what the settings and machine call for)
    models: dict[str, Model] = field(default_factory=dict)  # backend built (then warming up, ready, failing)
    # FOCAL_WORKERS > 1: this process is one of the HTTP front ends, and its models are views of the
    # ones in the model host process, reached through this socket (`service.remote`)
    model_host_socket: str | None = None
    repository: dict[str, ModelFolder] = field(default_factory=dict)  # every name this server knows, and its folder
    # loads, unloads and replaced models finishing their requests (they run to the end even if the
    # caller goes away; shutdown waits for them)
    repository_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    repository_locks: dict[str, asyncio.Lock] = field(default_factory=dict)  # one load or unload per name at a time
    loading: bool = True
    failed: str | None = None  # a model could not be loaded or warmed up
    draining: bool = False
    drain_deadline: float | None = None

    def begin_draining(self, budget_s: float | None = None) -> None:
        """Readiness false from now; queued work gets `budget_s` (default: the drain timeout setting)."""
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + (self.settings.drain_timeout_s if budget_s is None else budget_s)
            log.info("shutdown requested: readiness is now false; finishing queued work")

    def drain_remaining(self) -> float:
        """Seconds left of the one drain budget shared by uvicorn's shutdown and the batchers."""
        if self.drain_deadline is None:
            return self.settings.drain_timeout_s
        return max(0.0, self.drain_deadline - time.monotonic())

    def __post_init__(self) -> None:
        self.repository = {p.name: p for p in self.planned}

    def _unavailable(self, what: str) -> errors.ServiceError:
        """503 while the server starts (or failed to), with Retry-After."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.failed:
            return errors.Unavailable(f"{what} is not available (loading failed: {self.failed})", headers=retry)
        return errors.Unavailable(f"{what} is still loading", headers=retry)

    def _check_draining(self) -> None:
        if self.draining:
            raise errors.Unavailable(
                "the server is shutting down", headers={"Retry-After": str(self.settings.retry_after_s)}
            )

    @property
    def front_end(self) -> bool:
        return self.model_host_socket is not None

    def model_for_task(self, task: str) -> Model:
        """The first model (in start-up order, then load order) of `task` that may take requests;
        503 while the server drains or while such a model loads; 404 when there is none."""
        self._check_draining()
        candidates = [m for m in self.models.values() if m.task.name == task]
        for model in candidates:
            if model.health.serving:
                return model
        if candidates or ((self.loading or self.failed) and any(p.manifest.task == task for p in self.planned)):
            raise self._unavailable(f"the {task} model")
        raise errors.NotFound(f"no {task} model is loaded on this server")

    def model_named(self, name: str, version: str | None = None) -> Model:
        """The model served as `name` (and `version`, when given); 404 when it is not loaded, 503 while it
        loads or the server drains."""
        self._check_draining()
        model = self.models.get(name)
        if model is None:
            if (self.loading or self.failed) and any(p.name == name for p in self.planned):
                raise self._unavailable(f"model {name}")
            raise errors.NotFound(f"model {name!r} is not loaded on this server")
        if version is not None and version != model.version:
            raise errors.NotFound(f"model {name!r} version {version!r} is not loaded (version {model.version} is)")
        if not model.health.serving:
            raise errors.Unavailable(
                f"model {name} is {model.health.phase.value}",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        return model

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self.failed:
            return False, f"failed: {self.failed}"
        problems = []
        for model in self.models.values():
            ok, detail = model.health.readiness()
            if ok and not model.batcher.alive:
                ok, detail = False, "the batch worker stopped"
            if not ok:
                problems.append(f"{model.name}: {detail}")
        if problems:
            return False, "; ".join(problems)
        if self.loading:
            return False, "loading"
        return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        if self.failed:
            return False, f"failed: {self.failed}"
        if self.draining:
            return True, "alive (draining)"
        for model in self.models.values():
            ok, detail = model.health.liveness(model.batcher.alive, model.batcher.busy_for())
            if not ok:
                return False, f"{model.name}: {detail}"
        return True, "alive"
