"""The dynamic batcher on its own. The backends here are plain functions standing in for a model:
the batcher's contract is about queueing, grouping and failure isolation, not about the model."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import BackendError, DeadlineExceeded, Draining, DynamicBatcher, QueueFull


class Recorder:
    """A backend that doubles its input and records the batch sizes it saw."""

    def __init__(self, delay_s: float = 0.0, fail_on_call: int | None = None) -> None:
        self.sizes: list[int] = []
        self.delay_s, self.fail_on_call = delay_s, fail_on_call
        self.threads: set[str] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.sizes.append(len(batch))
        if self.fail_on_call is not None and len(self.sizes) == self.fail_on_call:
            raise RuntimeError("device lost")
        time.sleep(self.delay_s)
        return batch * 2


def _batcher(backend: Recorder, **kwargs: float) -> DynamicBatcher:
    options = {"max_batch_size": 4, "max_queue_delay_s": 0.05, "max_queue_size": 64} | kwargs
    return DynamicBatcher(backend, **options)


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    async def scenario() -> None:
        backend = Recorder()
        batcher = _batcher(backend)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(np.full(3, i, np.float32), 5.0) for i in range(10)))
        for i, result in enumerate(results):
            assert np.array_equal(result, np.full(3, 2 * i))
        assert max(backend.sizes) == 4
        assert sum(backend.sizes) == 10
        assert backend.threads
        assert "MainThread" not in backend.threads
        await batcher.stop()

    asyncio.run(scenario())


def test_a_lone_request_waits_at_most_the_queue_delay() -> None:
    async def scenario() -> None:
        batcher = _batcher(Recorder(), max_queue_delay_s=0.02)
        batcher.start()
        start = time.monotonic()
        await batcher.submit(np.zeros(3, np.float32), 5.0)
        assert time.monotonic() - start < 0.2  # 20 ms window + a trivial backend
        await batcher.stop()

    asyncio.run(scenario())


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    async def scenario() -> None:
        backend = Recorder(fail_on_call=1)
        batcher = _batcher(backend, max_batch_size=2)
        batcher.start()
        first = await asyncio.gather(
            *(batcher.submit(np.zeros(3, np.float32), 5.0) for _ in range(2)), return_exceptions=True
        )
        assert all(isinstance(r, BackendError) and "device lost" in str(r) for r in first)
        second = await batcher.submit(np.ones(3, np.float32), 5.0)  # the worker goes on
        assert np.array_equal(second, np.full(3, 2.0))
        assert batcher.alive
        await batcher.stop()

    asyncio.run(scenario())


def test_wrong_output_count_fails_the_batch() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(lambda b: b[:1], max_batch_size=4, max_queue_delay_s=0.05, max_queue_size=8)
        batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(np.zeros(3, np.float32), 5.0) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, BackendError) and "1 outputs for 3 inputs" in str(r) for r in results)
        await batcher.stop()

    asyncio.run(scenario())


def test_full_queue_refuses_at_once() -> None:
    async def scenario() -> None:
        backend = Recorder(delay_s=0.3)
        batcher = _batcher(backend, max_batch_size=1, max_queue_size=2, max_queue_delay_s=0.0)
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(np.zeros(3, np.float32), 5.0)) for _ in range(6)]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        refused = [r for r in done if isinstance(r, QueueFull)]
        assert 1 <= len(refused) <= 4
        assert all(isinstance(r, np.ndarray) for r in done if not isinstance(r, QueueFull))
        await batcher.stop()

    asyncio.run(scenario())


def test_expired_and_cancelled_requests_are_dropped_before_running() -> None:
    async def scenario() -> None:
        backend = Recorder(delay_s=0.2)
        batcher = _batcher(backend, max_batch_size=1, max_queue_delay_s=0.0)
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit(np.zeros(3, np.float32), 5.0))
        await asyncio.sleep(0.05)  # the backend is now busy with `busy`
        expiring = asyncio.ensure_future(batcher.submit(np.zeros(3, np.float32), 0.05))
        cancelled = asyncio.ensure_future(batcher.submit(np.zeros(3, np.float32), 5.0))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await busy
        with pytest.raises(DeadlineExceeded):
            await expiring
        await asyncio.sleep(0.05)
        assert backend.sizes == [1]  # neither ran
        await batcher.stop()

    asyncio.run(scenario())


def test_drain_finishes_queued_work_and_refuses_new() -> None:
    async def scenario() -> None:
        backend = Recorder(delay_s=0.05)
        batcher = _batcher(backend, max_batch_size=2)
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(np.zeros(3, np.float32), 5.0)) for _ in range(6)]
        await asyncio.sleep(0.01)
        assert await batcher.drain(5.0)
        with pytest.raises(Draining):
            await batcher.submit(np.zeros(3, np.float32), 5.0)
        assert all(isinstance(r, np.ndarray) for r in await asyncio.gather(*tasks))
        await batcher.stop()

    asyncio.run(scenario())


def test_drain_waits_for_a_batch_still_forming_and_stop_never_hangs() -> None:
    async def scenario() -> None:
        batcher = _batcher(Recorder(), max_queue_delay_s=0.3)
        batcher.start()
        task = asyncio.ensure_future(batcher.submit(np.ones(3, np.float32), 5.0))
        await asyncio.sleep(0.05)  # taken from the queue, the wait window still open
        assert batcher.queue_depth == 0
        assert await batcher.drain(5.0)
        assert np.array_equal(await task, np.full(3, 2.0))
        late = asyncio.ensure_future(asyncio.sleep(0))
        await batcher.stop()
        await late

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_the_deadline_holds_while_the_backend_hangs() -> None:
    async def scenario() -> None:
        batcher = _batcher(Recorder(delay_s=1.0), max_batch_size=1, max_queue_delay_s=0.0)
        batcher.start()
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(np.zeros(3, np.float32), 0.1)
        assert time.monotonic() - start < 0.5
        assert batcher.busy_for() > 0  # the stuck batch is visible (liveness uses it)
        await batcher.stop()

    asyncio.run(scenario())


def test_every_batch_reports_its_outcome_to_the_observer() -> None:
    """What the model's health counts: None for a batch that succeeded, the error for one that failed."""

    class Outcomes:
        def __init__(self) -> None:
            self.errors: list[str | None] = []
            self.sources: list[int] = []

        def queue_depth(self, depth: int) -> None:
            pass

        def batch_done(
            self, size: int, queue_waits: list[float], seconds: float, error: str | None, sources: int = 1
        ) -> None:
            self.errors.append(error)
            self.sources.append(sources)

        def dropped(self, reason: str) -> None:
            pass

    async def scenario() -> None:
        calls = {"n": 0}

        def flaky(batch: np.ndarray) -> np.ndarray:
            calls["n"] += 1
            if calls["n"] <= 2:
                raise RuntimeError("CUDA error")
            return batch

        outcomes = Outcomes()
        batcher = DynamicBatcher(flaky, max_batch_size=4, max_queue_delay_s=0.05, max_queue_size=8, observer=outcomes)
        batcher.start()
        for _ in range(2):
            with pytest.raises(BackendError):
                await batcher.submit(np.zeros(3, np.float32), 5.0)
        # One batch of samples from two submitters (front-end processes, in the model host): two sources.
        await asyncio.gather(*(batcher.submit(np.zeros(3, np.float32), 5.0, source) for source in "aab"))
        assert outcomes.errors == ["RuntimeError: CUDA error", "RuntimeError: CUDA error", None]
        assert outcomes.sources == [1, 1, 2]
        assert not batcher.backend_running
        await batcher.stop()

    asyncio.run(scenario())
