"""Dynamic batching: many single-image requests onto one backend, one batch at a time.

No web framework here. One `DynamicBatcher` per model:

- `submit(sample)` puts one preprocessed sample into a bounded queue and awaits
  its result; a full queue raises `QueueFull` at once (the caller answers 429).
- One worker task takes the first waiting sample, then waits at most
  `max_queue_delay_s` *from that first sample* for more, up to `max_batch_size`,
  drops samples whose caller went away or whose deadline passed, and runs the
  batch in a worker thread (onnxruntime and TensorRT release the GIL), so the
  event loop never blocks.
- An exception fails every future of that batch and nothing else; a backend that
  returns another number of outputs than it got inputs fails the batch too.
- `drain()` stops new submissions and lets the queued work finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class QueueFull(Exception):
    """The queue holds `max_queue_size` samples already."""


class Draining(Exception):
    """The batcher no longer accepts work (shutting down)."""


class DeadlineExceeded(Exception):
    """The sample's deadline passed while it was queued."""


class BackendError(Exception):
    """The backend failed on the batch this sample was in."""


class BatchObserver(Protocol):
    """What the batcher reports (the served model passes it on to its metrics and its health)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch_done(
        self, size: int, queue_waits: list[float], seconds: float, error: str | None, sources: int = 1
    ) -> None:
        """A batch ran; `error` says why it failed (None: it succeeded); `sources`: how many
        submitters' samples it held (front-end processes, when `FOCAL_WORKERS` > 1)."""

    def dropped(self, reason: str) -> None: ...


class _NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(
        self, size: int, queue_waits: list[float], seconds: float, error: str | None, sources: int = 1
    ) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass


@dataclass
class _Item:
    sample: np.ndarray
    future: asyncio.Future[np.ndarray]
    deadline: float
    source: str = ""
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        observer: BatchObserver | None = None,
        name: str = "model",
        turns: asyncio.Lock | None = None,
    ) -> None:
        """`turns`: a lock this batcher holds while its batch runs, shared with other batchers that must
        not run at the same time (a model's canvases on a CPU); its batch's clock starts once it has it."""
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_queue_delay_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.name = name
        self.turns = turns
        self.observer: BatchObserver = observer or _NullObserver()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._worker: asyncio.Task[None] | None = None
        self._accepting = False
        self._forming: list[_Item] = []  # taken from the queue, batch not yet complete
        self.in_flight = 0
        self.batch_started: float | None = None  # monotonic time the running batch started
        self.backend_running = False  # a backend call is running in the worker thread (even after a cancel)
        self.closed_reason = "the server is shutting down"  # what refused or dropped work is told

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None:
            self._accepting = True
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    @property
    def alive(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def busy_for(self) -> float:
        """Seconds the current batch has been running (0 when idle): a stuck backend shows here."""
        return 0.0 if self.batch_started is None else time.monotonic() - self.batch_started

    def _pending(self) -> int:
        return self._queue.qsize() + len(self._forming) + self.in_flight

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, wait until the queue and the batch in flight are done. True if drained in time."""
        self._accepting = False
        end = time.monotonic() + timeout_s
        while self._pending() and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return not self._pending()

    async def stop(self) -> None:
        """Cancel the worker; anything still queued fails with `Draining`."""
        self._accepting = False
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        leftovers = self._forming + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        self._forming = []
        for item in leftovers:
            if not item.future.done():
                item.future.set_exception(Draining(self.closed_reason))
        # Never block the event loop on a stuck backend call; the thread ends with the process.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- requests ----------------------------------------------------------------------------
    async def submit(self, sample: np.ndarray, timeout_s: float, source: str = "") -> np.ndarray:
        """Queue one sample and wait for its output row. `source`: who sent it (counted per batch)."""
        if not self._accepting:
            raise Draining(self.closed_reason)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(sample, future, time.monotonic() + timeout_s, source))
        except asyncio.QueueFull:
            raise QueueFull(f"the queue of {self.name} is full ({self._queue.maxsize} waiting)") from None
        self.observer.queue_depth(self._queue.qsize())
        try:  # the deadline holds even if the backend hangs; the worker skips a cancelled future
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no result within the request timeout of {timeout_s:g} s") from None

    async def run_alone(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch on the batch thread outside the queue (warm-up): `backend_running` tracks it too."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, batch)

    # -- worker ------------------------------------------------------------------------------
    def _run(self, inputs: np.ndarray) -> np.ndarray:
        """In the worker thread."""
        self.backend_running = True
        try:
            return self.run_batch(inputs)
        finally:
            self.backend_running = False

    async def _next_batch(self) -> list[_Item]:
        batch = self._forming = [await self._queue.get()]  # visible to drain()/stop() while it forms
        window_end = time.monotonic() + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            remaining = window_end - time.monotonic()
            if remaining <= 0:
                while len(batch) < self.max_batch_size and not self._queue.empty():
                    batch.append(self._queue.get_nowait())  # already waiting: no reason to leave them
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        self._forming = []
        return batch

    def _live(self, batch: list[_Item]) -> list[_Item]:
        now, live = time.monotonic(), []
        for item in batch:
            if item.future.done():  # the caller went away (cancelled)
                self.observer.dropped("cancelled")
            elif item.deadline <= now:
                item.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
                self.observer.dropped("deadline")
            else:
                live.append(item)
        return live

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if self.turns is None:
                await self._run_one(batch)
                continue
            self._forming = batch  # waiting for its turn: still pending, and failed by stop()
            async with self.turns:  # FIFO among the batchers that share it
                self._forming = []
                await self._run_one(batch)

    async def _run_one(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        # One batch: the deadlines checked now, then the backend.
        batch = self._live(batch)
        self.observer.queue_depth(self._queue.qsize())
        if not batch:
            return
        self.in_flight = len(batch)
        start = self.batch_started = time.monotonic()
        waits = [start - item.enqueued for item in batch]
        failure: str | None = None
        cancelled = False
        try:
            inputs = np.stack([item.sample for item in batch])
            outputs = await loop.run_in_executor(self._executor, self._run, inputs)
            if len(outputs) != len(batch):
                raise BackendError(f"the backend returned {len(outputs)} outputs for {len(batch)} inputs")
            for item, output in zip(batch, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result(output)
        except asyncio.CancelledError:
            cancelled = True
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Draining(self.closed_reason))
            raise
        except Exception as exc:  # one failed batch fails its own requests only
            error = exc if isinstance(exc, BackendError) else BackendError(f"{type(exc).__name__}: {exc}")
            failure = str(error)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        finally:
            self.in_flight, self.batch_started = 0, None
            if not cancelled:  # a batch cut short by shutdown says nothing about the backend
                sources = len({item.source for item in batch})
                self.observer.batch_done(len(batch), waits, time.monotonic() - start, failure, sources)
