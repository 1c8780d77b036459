"""The health of one served model: a small state machine, driven by the model's lifecycle and by
the outcome of every batch, that answers the readiness and liveness probes.

    loading -> warming up -> ready <-> failing        (load or warm-up error: failed)

- `failing_after_batches` failed batches in a row make a ready model *failing*:
  readiness turns false, so Kubernetes stops sending it traffic. Nothing would then
  ever run a batch again, so the model probes itself (`ServedModel`, a synthetic
  batch with backoff); any successful batch, probe or request, makes it ready again.
  A model with several parts that run apart (a detector's canvases, each its own
  backend) counts each part's failures on their own: a part that keeps failing makes
  the model failing however well the others do, and only its own success recovers it.
- A model failing for `unhealthy_after_s` turns liveness false: the probes have not
  helped, and a restart (a fresh process, a fresh CUDA context) is what is left.
- A batch running for longer than `stuck_batch_s`, or a batch worker that died,
  turns liveness false too: the backend is stuck.
- A model that failed to load or warm up is *failed*: neither ready nor live.

No clock of its own: `clock` is injected, so every transition is tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Phase(str, Enum):
    LOADING = "loading"
    WARMING_UP = "warming up"
    READY = "ready"
    FAILING = "failing"
    FAILED = "failed"


@dataclass(frozen=True)
class HealthPolicy:
    failing_after_batches: int = 3
    unhealthy_after_s: float = 60.0
    stuck_batch_s: float = 60.0


class ModelHealth:
    def __init__(self, policy: HealthPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy, self.clock = policy, clock
        self.phase = Phase.LOADING
        self.consecutive_failures = 0  # the most of any part's
        self._failures: dict[str, int] = {}  # failed batches in a row, per part
        self.failing_since: float | None = None
        self.last_error: str | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def warming_up(self) -> None:
        self.phase = Phase.WARMING_UP

    def warmed_up(self) -> None:
        self.phase = Phase.READY

    def failed(self, error: str) -> None:
        """Loading or warming up failed: nothing will serve."""
        self.phase, self.last_error = Phase.FAILED, error

    # -- batches ---------------------------------------------------------------------------
    def batch_done(self, error: str | None, part: str = "") -> bool:
        """Record a batch's outcome (None: success) on one part of the model. True when this batch
        made the model failing (the caller then starts probing)."""
        if self.phase not in (Phase.READY, Phase.FAILING):
            return False
        self._failures[part] = 0 if error is None else self._failures.get(part, 0) + 1
        self.consecutive_failures = max(self._failures.values())
        if error is None:
            if self.consecutive_failures < self.policy.failing_after_batches:  # no part still failing
                self.phase, self.failing_since = Phase.READY, None
            return False
        self.last_error = error
        if self.phase is Phase.READY and self.consecutive_failures >= self.policy.failing_after_batches:
            self.phase, self.failing_since = Phase.FAILING, self.clock()
            return True
        return False

    # -- another process's view -------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The state, as JSON, for a front-end process (`follow`)."""
        return {
            "phase": self.phase.value,
            "consecutive_failures": self.consecutive_failures,
            "failing_for": self.failing_for() if self.failing_since is not None else None,
            "last_error": self.last_error,
        }

    def follow(self, snapshot: dict[str, Any]) -> None:
        """Take the state of the health in the model host process (`snapshot`), so that the probes
        answer here as they do there."""
        self.phase = Phase(snapshot["phase"])
        self.consecutive_failures = int(snapshot["consecutive_failures"])
        failing_for = snapshot["failing_for"]
        self.failing_since = None if failing_for is None else self.clock() - float(failing_for)
        self.last_error = snapshot["last_error"]

    # -- probes ----------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """Whether requests may be sent to the model (a failing one still tries)."""
        return self.phase in (Phase.READY, Phase.FAILING)

    def failing_for(self) -> float:
        return 0.0 if self.failing_since is None else self.clock() - self.failing_since

    def readiness(self) -> tuple[bool, str]:
        if self.phase is Phase.READY:
            return True, "ready"
        if self.phase is Phase.FAILING:
            return False, (
                f"failing: the last {self.consecutive_failures} batches failed ({self.last_error}); "
                f"probing for {self.failing_for():.0f} s"
            )
        if self.phase is Phase.FAILED:
            return False, f"failed: {self.last_error}"
        return False, self.phase.value

    def liveness(self, worker_alive: bool, busy_for: float) -> tuple[bool, str]:
        """`worker_alive`: the batch worker runs; `busy_for`: seconds the current batch has run (0: idle)."""
        if self.phase is Phase.FAILED:
            return False, f"failed: {self.last_error}"
        if self.phase in (Phase.LOADING, Phase.WARMING_UP):
            return True, "alive"
        if not worker_alive:
            return False, "the batch worker stopped"
        if busy_for > self.policy.stuck_batch_s:
            return False, f"a batch has run for {busy_for:.0f} s, over {self.policy.stuck_batch_s:g} s (backend stuck)"
        if self.phase is Phase.FAILING and self.failing_for() >= self.policy.unhealthy_after_s:
            return False, (
                f"failing for {self.failing_for():.0f} s, over {self.policy.unhealthy_after_s:g} s, "
                f"and probes did not recover it ({self.last_error})"
            )
        return True, "alive"
