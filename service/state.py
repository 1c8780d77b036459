"""What the routes share, on `app.state.service`: settings, metrics, the thread pool, the models
(planned at start-up, served once loaded) and the server's readiness and liveness."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.models import ModelFolder, ServedModel

log = logging.getLogger("focal.service")


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    preprocess_pool: ThreadPoolExecutor
    planned: list[ModelFolder]  # checked at start-up, in load order
    models: dict[str, ServedModel] = field(default_factory=dict)  # backend built (then warming up, ready, failing)
    loading: bool = True
    failed: str | None = None  # a model could not be loaded or warmed up
    draining: bool = False
    drain_deadline: float | None = None

    def begin_draining(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s
            log.info("shutdown requested: readiness is now false; finishing queued work")

    def drain_remaining(self) -> float:
        """Seconds left of the one drain budget shared by uvicorn's shutdown and the batchers."""
        if self.drain_deadline is None:
            return self.settings.drain_timeout_s
        return max(0.0, self.drain_deadline - time.monotonic())

    def serves(self, task: str) -> bool:
        """Whether this server was started with a model of this task (loaded yet or not)."""
        return any(p.manifest.task == task for p in self.planned)

    def by_task(self, task: str) -> ServedModel | None:
        """The model serving this task, once it may take requests."""
        return next((m for m in self.models.values() if m.task.name == task and m.health.serving), None)

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
