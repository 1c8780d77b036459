"""The request path every protocol shares, with no web framework in it: admission, decoding and the
task's transform in the thread pool, inference through the model's batcher with the request's
deadline, and post-processing off the event loop.

`/classify` and `/detect` (`service.api`), the Open Inference Protocol over REST and gRPC
(`service.v2`) all call these, so every request meets the same limits, queue, deadlines and
errors (`service.errors`, which each protocol renders in its own shape).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from service import errors
from service.batcher import BackendError, DeadlineExceeded, Draining, QueueFull
from service.images import ImageError, ImageTooLarge, decode_with_size
from service.state import ServiceState

if TYPE_CHECKING:
    from service.models import Model
    from service.tasks import Placed

T = TypeVar("T")
R = TypeVar("R")


def admit(state: ServiceState, model: Model) -> None:
    """Refuse before reading or decoding anything when the model's queue is already full."""
    if model.batcher.queue_depth >= state.settings.max_queue_size:
        raise errors.Overloaded(
            f"the queue of {model.name} is full", headers={"Retry-After": str(state.settings.retry_after_s)}
        )


def check_image_count(state: ServiceState, count: int) -> None:
    limit = state.settings.max_images_per_request
    if count > limit:
        raise errors.PayloadTooLarge(f"{count} images in one request; the limit is {limit}")
    if count < 1:
        raise errors.BadImage("the request holds no image")


async def off_loop(state: ServiceState, work: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`work` over `items` in the thread pool (work that would block the event loop)."""
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(state.preprocess_pool, work, item) for item in items)))


async def prepare(state: ServiceState, model: Model, blobs: Sequence[bytes]) -> list[Placed]:
    """Decode + the task's transform for every image in the thread pool; one bad image fails the request."""
    transform, max_pixels = model.transform, state.settings.max_pixels
    draft = transform.draft_short_side if state.settings.jpeg_draft else None

    def one(data: bytes) -> Placed:
        image, full_size = decode_with_size(data, max_pixels, draft_short_side=draft)
        return transform.to_canvas(image, full_size)

    loop = asyncio.get_running_loop()
    results = await asyncio.gather(
        *(loop.run_in_executor(state.preprocess_pool, one, data) for data in blobs), return_exceptions=True
    )
    placed: list[Placed] = []
    for i, result in enumerate(results):
        where = f"image {i + 1} of {len(blobs)}: " if len(blobs) > 1 else ""
        if isinstance(result, ImageTooLarge):
            raise errors.PayloadTooLarge(where + str(result))
        if isinstance(result, ImageError):
            raise errors.BadImage(where + str(result))
        if isinstance(result, BaseException):
            raise result
        placed.append(result)
    return placed


class ClientGone(Exception):
    """The caller went away before its results were ready; its samples were taken out of the queue."""


async def infer(
    state: ServiceState,
    model: Model,
    samples: Sequence[np.ndarray],
    timeout_s: float | None = None,
    gone: Callable[[], Awaitable[None]] | None = None,
) -> list[np.ndarray]:
    """Every sample through the model's batcher; their output rows, in order.

    `timeout_s`: the request's deadline (default, and at most: the request timeout setting).
    `gone()`: completes when the caller disconnects; the samples then leave the queue (`ClientGone`)."""
    limit = state.settings.request_timeout_s
    timeout = limit if timeout_s is None else max(0.0, min(timeout_s, limit))
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    tasks = [asyncio.ensure_future(model.batcher.submit(sample, timeout)) for sample in samples]
    results = asyncio.ensure_future(asyncio.gather(*tasks))
    watch = asyncio.ensure_future(gone()) if gone is not None else None
    try:
        await asyncio.wait({results} | ({watch} if watch else set()), return_when=asyncio.FIRST_COMPLETED)
        if not results.done():  # nobody to answer: take the samples out of the queue
            raise ClientGone()
        return list(results.result())
    except QueueFull as exc:
        raise errors.Overloaded(str(exc), headers=retry) from exc
    except Draining as exc:
        raise errors.Unavailable(str(exc), headers=retry) from exc
    except DeadlineExceeded as exc:
        raise errors.Timeout(str(exc)) from exc
    except BackendError as exc:
        raise errors.BackendFailed(f"inference failed: {exc}") from exc
    finally:
        if watch is not None:
            watch.cancel()
        for task in [*tasks, results]:  # a failed sibling or a vanished caller: drop the rest from the queue
            task.cancel()
            # A task can still end with an error after this (cancelling races a deadline firing); its
            # caller is gone, so it is seen here rather than reported as never retrieved.
            task.add_done_callback(_seen)


def _seen(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
