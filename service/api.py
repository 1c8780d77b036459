"""Routes: /classify, /detect, health probes, /v1/models, /metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from service import errors
from service.app import ServiceState
from service.batcher import BackendError, DeadlineExceeded, Draining, QueueFull
from service.detection import postprocess
from service.images import (
    ImageError,
    ImageTooLarge,
    Letterbox,
    Letterboxed,
    decode_with_size,
    letterbox,
    preprocess,
)
from service.models import ServedModel
from service.schemas import ClassifyResponse, DetectResponse, ErrorResponse, Health, ModelsResponse

router = APIRouter()

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
RETRY_AFTER_S = "1"

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "an image could not be decoded",
        413: "body, image pixel count or number of images over the limit",
        415: "unsupported content type",
        422: "bad parameters",
        429: "queue full (Retry-After)",
        503: "not ready or shutting down (Retry-After)",
        504: "deadline passed while queued",
        500: "the backend failed on this request's batch",
    }.items()
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


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


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


async def _prepare(state: ServiceState, model: ServedModel, blobs: list[bytes]) -> list[Any]:
    """Decode + preprocess every image in the thread pool; one bad image fails this request only.

    Returns float32 [3, H, W] arrays for a classifier, `Letterboxed` canvases for a detector."""
    loop = asyncio.get_running_loop()
    spec, max_pixels = model.preprocess, state.settings.max_pixels

    def one(data: bytes) -> np.ndarray | Letterboxed:
        image, full_size = decode_with_size(data, max_pixels, draft_short_side=spec.draft_short_side)
        return letterbox(image, spec, full_size) if isinstance(spec, Letterbox) else preprocess(image, spec)

    results = await asyncio.gather(
        *(loop.run_in_executor(state.preprocess_pool, one, data) for data in blobs), return_exceptions=True
    )
    for i, result in enumerate(results):
        where = f"image {i + 1} of {len(blobs)}: " if len(blobs) > 1 else ""
        if isinstance(result, ImageTooLarge):
            raise errors.PayloadTooLarge(where + str(result))
        if isinstance(result, ImageError):
            raise errors.BadImage(where + str(result))
        if isinstance(result, BaseException):
            raise result
    return [r for r in results if not isinstance(r, BaseException)]


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _infer(
    state: ServiceState, model: ServedModel, samples: list[np.ndarray], request: Request
) -> list[np.ndarray]:
    timeout = state.settings.request_timeout_s
    tasks = [asyncio.ensure_future(model.batcher.submit(sample, timeout)) for sample in samples]
    results = asyncio.ensure_future(asyncio.gather(*tasks))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not results.done():  # nobody to answer: take the images out of the queue
            raise ClientDisconnect()
        return list(results.result())
    except QueueFull as exc:
        raise errors.Overloaded(str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc
    except Draining as exc:
        raise errors.Unavailable(str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc
    except DeadlineExceeded as exc:
        raise errors.Timeout(str(exc)) from exc
    except BackendError as exc:
        raise errors.BackendFailed(f"inference failed: {exc}") from exc
    finally:
        gone.cancel()
        for task in tasks:  # a failed sibling or a vanished client: drop the rest from the queue
            task.cancel()


def _model_for(state: ServiceState, task: str) -> ServedModel:
    if state.draining:
        raise errors.Unavailable("the server is shutting down", headers={"Retry-After": RETRY_AFTER_S})
    model = state.by_task(task)
    if model is None:
        if state.loading and not state.failed:
            raise errors.Unavailable("the models are still loading", headers={"Retry-After": RETRY_AFTER_S})
        raise errors.NotFound(f"no {task} model is loaded on this server")
    return model


def _admit(state: ServiceState, model: ServedModel) -> None:
    """Refuse before reading or decoding anything when the model's queue is already full."""
    if model.batcher.queue_depth >= state.settings.max_queue_size:
        raise errors.Overloaded(f"the queue of {model.name} is full", headers={"Retry-After": RETRY_AFTER_S})


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True))


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=_ERRORS,
    openapi_extra=_IMAGE_BODY,
    summary="Classify one or more images",
)
async def classify(
    request: Request,
    top_k: Annotated[int, Query(ge=1, description="predictions per image (1..num_classes)")] = 5,
) -> dict[str, Any]:
    state = _state(request)
    model = _model_for(state, "classify")
    if top_k > len(model.labels):
        raise errors.InvalidParameter(f"top_k: must be at most the number of classes ({len(model.labels)})")
    _admit(state, model)
    blobs = await _read_images(request, state.settings.max_images_per_request)
    samples = await _prepare(state, model, blobs)
    outputs = await _infer(state, model, samples, request)
    results = []
    for probs in softmax(np.stack(outputs).astype(np.float64)):
        top = np.argsort(-probs, kind="stable")[:top_k]
        results.append(
            {"predictions": [{"class_id": int(i), "label": model.labels[i], "score": float(probs[i])} for i in top]}
        )
    return {"model": model.info(), "results": results}


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses=_ERRORS,
    openapi_extra=_IMAGE_BODY,
    summary="Detect objects in one or more images (needs a detection model)",
)
async def detect(
    request: Request,
    score_threshold: Annotated[
        float, Query(ge=0.0, le=1.0, description="keep detections scoring above this (the export's 0.05 at least)")
    ] = 0.3,
    max_detections: Annotated[int, Query(ge=1, description="detections per image, at most the export's (100)")] = 100,
) -> dict[str, Any]:
    state = _state(request)
    model = _model_for(state, "detect")
    settings = model.detection
    assert settings is not None  # every detect model has its settings (checked at load)
    if max_detections > settings.max_detections:
        raise errors.InvalidParameter(f"max_detections: must be at most {settings.max_detections}")
    _admit(state, model)
    blobs = await _read_images(request, state.settings.max_images_per_request)
    boxed: list[Letterboxed] = await _prepare(state, model, blobs)
    outputs = await _infer(state, model, [b.pixels for b in boxed], request)

    def finish(rows: np.ndarray, image: Letterboxed) -> dict[str, Any]:
        found = postprocess(
            rows, settings, image.image_size, image.resized, image.scale, score_threshold, max_detections
        )
        return {
            "detections": [
                {"class_id": c, "label": model.labels[c], "score": score, "box": [x1, y1, x2, y2]}
                for x1, y1, x2, y2, score, c in found
            ],
            "image_size": list(image.image_size),
        }

    loop = asyncio.get_running_loop()
    results = await asyncio.gather(
        *(loop.run_in_executor(state.preprocess_pool, finish, rows, b) for rows, b in zip(outputs, boxed, strict=True))
    )
    return {"model": model.info(), "results": list(results)}


def _probe(ok: bool, detail: str) -> JSONResponse:
    return JSONResponse(
        Health(status="ok" if ok else "unavailable", detail=detail).model_dump(), status_code=200 if ok else 503
    )


@router.get("/healthz", response_model=Health, summary="Liveness: the process and its batch workers are alive")
@router.get("/v2/health/live", response_model=Health, include_in_schema=False)
async def healthz(request: Request) -> JSONResponse:
    return _probe(*_state(request).liveness())


@router.get("/readyz", response_model=Health, summary="Readiness: every model loaded and warmed up, not draining")
@router.get("/v2/health/ready", response_model=Health, include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    return _probe(*_state(request).readiness())


@router.get("/v1/models", response_model=ModelsResponse, summary="The loaded models and their manifest facts")
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {
        "models": [{**m.info(), "ready": m.ready, "warmup_seconds": m.warmup_seconds} for m in state.models.values()]
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
