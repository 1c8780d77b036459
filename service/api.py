"""Generic request handling, the same for every task, and the routes that are not a task's:
health probes, /v1/models, /metrics.

A task's route (`service.tasks`) does: `serving_model` (which model, or 404/503), its own
parameter checks, `run_images` (admission, reading the body, decoding and the task's
transform in the thread pool, inference through the batcher with the request's
deadline), then its own post-processing and response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from service import errors
from service.batcher import BackendError, DeadlineExceeded, Draining, QueueFull
from service.images import ImageError, ImageTooLarge, decode_with_size
from service.schemas import ErrorResponse, Health, ModelsResponse
from service.state import ServiceState

if TYPE_CHECKING:
    from service.models import ServedModel
    from service.tasks import Placed

router = APIRouter()

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
IMAGE_ROUTE_ERRORS = {
    400: "an image could not be decoded, or the multipart body is malformed",
    404: "no model of this task was configured on this server",
    413: "body, image pixel count or number of images over the limit",
    415: "unsupported content type",
    422: "bad parameters",
    429: "queue full (Retry-After)",
    500: "the backend failed on this request's batch",
    503: "its model is still loading or failed to load, or the server is shutting down (Retry-After)",
    504: "deadline passed while queued",
}
_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["image"],
                }
            },
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
        },
    }
}


def error_responses(statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, each with the error body's schema."""
    return {code: {"model": ErrorResponse, "description": text} for code, text in statuses.items()}


def image_route(summary: str) -> dict[str, Any]:
    """The keyword arguments of `router.post` for a route that takes images: every status it can answer."""
    return {"responses": error_responses(IMAGE_ROUTE_ERRORS), "openapi_extra": _IMAGE_BODY, "summary": summary}


async def _state(request: Request) -> ServiceState:  # async: FastAPI would run a plain def in a thread
    state: ServiceState = request.app.state.service
    return state


State = Annotated[ServiceState, Depends(_state)]


def serving_model(state: ServiceState, task: str) -> ServedModel:
    """The model of `task`; 503 while it loads (or if it failed to) or the server drains; 404 when none was
    configured."""
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    if state.draining:
        raise errors.Unavailable("the server is shutting down", headers=retry)
    model = state.by_task(task)
    if model is not None:
        return model
    if not state.serves(task):
        raise errors.NotFound(f"no {task} model is loaded on this server")
    if state.failed:
        raise errors.Unavailable(f"the {task} model is not available (loading failed: {state.failed})", headers=retry)
    raise errors.Unavailable(f"the {task} model is still loading", headers=retry)


async def run_images(
    request: Request, state: ServiceState, model: ServedModel
) -> tuple[list[Placed], list[np.ndarray]]:
    """The request's images, each through the task's transform and the model: (placed, output) pairs in order."""
    _admit(state, model)
    blobs = await _read_images(request, state.settings.max_images_per_request)
    placed = await _prepare(state, model, blobs)
    outputs = await _infer(state, model, [p.pixels for p in placed], request)
    return placed, outputs


T = TypeVar("T")
R = TypeVar("R")


async def off_loop(state: ServiceState, work: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`work` over `items` in the thread pool (post-processing that would block the event loop)."""
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(state.preprocess_pool, work, item) for item in items)))


def _admit(state: ServiceState, model: ServedModel) -> None:
    """Refuse before reading or decoding anything when the model's queue is already full."""
    if model.batcher.queue_depth >= state.settings.max_queue_size:
        raise errors.Overloaded(
            f"the queue of {model.name} is full", headers={"Retry-After": str(state.settings.retry_after_s)}
        )


async def _read_images(request: Request, limit: int) -> list[bytes]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form()  # Starlette's own caps (1000 parts) sit above ours; the body limit bounds size
        parts = form.getlist("image")
        if not parts:
            raise errors.BadImage("the multipart body has no part named 'image'")
        if len(parts) > limit:
            raise errors.PayloadTooLarge(f"{len(parts)} images in one request; the limit is {limit}")
        images = []
        for part in parts:
            if isinstance(part, str):
                raise errors.BadImage("the 'image' parts must be files, not text fields")
            images.append(await part.read())
        return images
    if content_type in IMAGE_TYPES or content_type == "application/octet-stream":
        return [await request.body()]
    raise errors.UnsupportedMediaType(
        f"content type {content_type or '(none)'!r} is not accepted; send multipart/form-data with 'image' parts "
        f"or a raw body of type {', '.join(IMAGE_TYPES)}"
    )


async def _prepare(state: ServiceState, model: ServedModel, blobs: list[bytes]) -> list[Placed]:
    """Decode + the task's transform for every image in the thread pool; one bad image fails this request."""
    transform, max_pixels = model.transform, state.settings.max_pixels

    def one(data: bytes) -> Placed:
        image, full_size = decode_with_size(data, max_pixels, draft_short_side=transform.draft_short_side)
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


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _infer(
    state: ServiceState, model: ServedModel, samples: list[np.ndarray], request: Request
) -> list[np.ndarray]:
    timeout = state.settings.request_timeout_s
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    tasks = [asyncio.ensure_future(model.batcher.submit(sample, timeout)) for sample in samples]
    results = asyncio.ensure_future(asyncio.gather(*tasks))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not results.done():  # nobody to answer: take the images out of the queue
            raise ClientDisconnect()
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
        gone.cancel()
        for task in tasks:  # a failed sibling or a vanished client: drop the rest from the queue
            task.cancel()


# -- the routes that are not a task's ----------------------------------------------------------
_PROBE_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": Health, "description": "not live / not ready (the detail says why)"}
}


def _probe(ok: bool, detail: str) -> JSONResponse:
    return JSONResponse(
        Health(status="ok" if ok else "unavailable", detail=detail).model_dump(), status_code=200 if ok else 503
    )


@router.get(
    "/healthz",
    response_model=Health,
    responses=_PROBE_RESPONSES,
    summary="Liveness: the process and its batch workers are alive, no model failing for long",
)
@router.get("/v2/health/live", response_model=Health, responses=_PROBE_RESPONSES, include_in_schema=False)
async def healthz(state: State) -> JSONResponse:
    return _probe(*state.liveness())


@router.get(
    "/readyz",
    response_model=Health,
    responses=_PROBE_RESPONSES,
    summary="Readiness: every model loaded, warmed up and not failing; not draining",
)
@router.get("/v2/health/ready", response_model=Health, responses=_PROBE_RESPONSES, include_in_schema=False)
async def readyz(state: State) -> JSONResponse:
    return _probe(*state.readiness())


@router.get("/v1/models", response_model=ModelsResponse, summary="The loaded models and their manifest facts")
async def models(state: State) -> dict[str, Any]:
    return {
        "models": [
            {
                **m.info(),
                "ready": m.health.readiness()[0],
                "status": m.health.phase.value,
                "warmup_seconds": m.warmup_seconds,
            }
            for m in state.models.values()
        ]
    }


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
