"""Generic request handling, the same for every task, and the routes that are not a task's:
health probes, /v1/models, /metrics.

A task's route (`service.tasks`) does: `state.model_for_task(...).lease()` (which model, or
404/503), its own parameter checks, `run_images` (reading the body, then `service.inference`:
admission, decoding and the task's transform in the thread pool, inference through the batcher
with the request's deadline), then its own post-processing and response.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from service import errors, inference
from service.schemas import ErrorResponse, Health, ModelsResponse
from service.state import ServiceState

if TYPE_CHECKING:
    from service.models import Model
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


async def run_images(request: Request, state: ServiceState, model: Model) -> tuple[list[Placed], list[np.ndarray]]:
    """The request's images, each through the task's transform and the model: (placed, output) pairs in order."""
    inference.admit(state, model)
    blobs = await _read_images(request, state)
    placed = await inference.prepare(state, model, blobs)
    try:
        outputs = await inference.infer(
            state, model, [p.pixels for p in placed], gone=functools.partial(client_gone, request)
        )
    except inference.ClientGone:
        raise ClientDisconnect() from None
    return placed, outputs


async def _read_images(request: Request, state: ServiceState) -> list[bytes]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form()  # Starlette's own caps (1000 parts) sit above ours; the body limit bounds size
        parts = form.getlist("image")
        if not parts:
            raise errors.BadImage("the multipart body has no part named 'image'")
        inference.check_image_count(state, len(parts))  # before any part is read
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


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
