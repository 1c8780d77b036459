"""The health state machine on its own, with a clock the tests move."""

from __future__ import annotations

from service.health import HealthPolicy, ModelHealth, Phase


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ready_model(clock: Clock, **policy: float) -> ModelHealth:
    health = ModelHealth(HealthPolicy(**{"failing_after_batches": 3, "unhealthy_after_s": 60.0, **policy}), clock)
    health.warming_up()
    health.warmed_up()
    return health


def test_loading_and_warming_up_are_live_but_not_ready() -> None:
    health = ModelHealth(HealthPolicy(), Clock())
    assert (health.readiness(), health.liveness(False, 0)) == ((False, "loading"), (True, "alive"))
    health.warming_up()
    assert health.readiness() == (False, "warming up")
    assert not health.serving
    health.warmed_up()
    assert health.readiness() == (True, "ready")
    assert health.serving


def test_failures_in_a_row_make_it_failing_and_one_success_resets() -> None:
    clock = Clock()
    health = ready_model(clock)
    assert not health.batch_done("boom")
    assert not health.batch_done(None)  # the count restarts
    assert not health.batch_done("boom")
    assert not health.batch_done("boom")
    assert health.phase is Phase.READY
    assert health.batch_done("CUDA error 700")  # the third in a row: failing, start probing (once)
    assert not health.batch_done("CUDA error 700")
    ok, detail = health.readiness()
    assert not ok
    assert detail.startswith("failing: the last 4 batches failed (CUDA error 700)")
    assert health.serving  # still tries requests that reach it
    assert not health.batch_done(None)
    assert (health.phase, health.readiness(), health.consecutive_failures) == (Phase.READY, (True, "ready"), 0)


def test_failing_for_too_long_turns_liveness_false_and_recovery_clears_it() -> None:
    clock = Clock()
    health = ready_model(clock, unhealthy_after_s=60.0)
    for _ in range(3):
        health.batch_done("device lost")
    clock.now += 59.9
    assert health.liveness(True, 0) == (True, "alive")
    clock.now += 0.1
    ok, detail = health.liveness(True, 0)
    assert not ok
    assert "failing for 60 s, over 60 s" in detail
    assert "device lost" in detail
    health.batch_done(None)  # a probe succeeded just in time
    assert health.liveness(True, 0) == (True, "alive")
    assert health.failing_for() == 0


def test_a_stuck_batch_or_a_dead_worker_is_not_live() -> None:
    health = ready_model(Clock(), stuck_batch_s=60.0)
    assert health.liveness(True, 59.0)[0]
    assert health.liveness(True, 61.0) == (False, "a batch has run for 61 s, over 60 s (backend stuck)")
    assert health.liveness(False, 0) == (False, "the batch worker stopped")


def test_a_failed_load_is_neither_ready_nor_live_and_ignores_batches() -> None:
    health = ModelHealth(HealthPolicy(), Clock())
    health.failed("RuntimeError: no GPU")
    assert not health.batch_done("late")
    assert health.readiness() == (False, "failed: RuntimeError: no GPU")
    assert health.liveness(True, 0) == (False, "failed: RuntimeError: no GPU")


def test_a_part_that_keeps_failing_makes_the_model_failing_whatever_the_others_do() -> None:
    """A detector's canvases run on backends of their own: one canvas's broken engine must not hide behind
    the others' successes, and only that canvas's own success recovers the model."""
    health = ready_model(Clock())
    for _ in range(2):
        assert not health.batch_done("engine lost", "640x480")
        assert not health.batch_done(None, "640x640")  # the healthy canvas does not reset the broken one
    assert health.batch_done("engine lost", "640x480")
    assert health.phase is Phase.FAILING
    assert health.consecutive_failures == 3
    assert not health.batch_done(None, "640x640")
    assert health.phase is Phase.FAILING
    assert not health.batch_done(None, "640x480")
    assert health.readiness() == (True, "ready")
    assert health.consecutive_failures == 0
