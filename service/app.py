"""App factory: `create_app(settings)` wires settings, models, middleware, error handlers and routes.

Models are checked when the app is created (a bad folder fails at once), then
loaded and warmed up in the background after start-up, so `/healthz` answers
and `/readyz` says 503 ("loading") meanwhile. The Open Inference Protocol's gRPC
server (`service.v2.grpc_service`) runs in the same event loop, on its own port.
On shutdown the gRPC server finishes its calls, then each model drains its queue
within the drain budget and closes its backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.api import error_responses
from service.api import router as common_routes
from service.health import ModelHealth
from service.logs import request_id_var
from service.metrics import Metrics
from service.models import (
    BackendLoader,
    ModelFolder,
    ModelLoadError,
    ServedModel,
    check_model_folder,
    health_policy,
    split_model_spec,
)
from service.repository import announce
from service.settings import Settings
from service.state import ServiceState
from service.tasks import TASKS
from service.v2.grpc_service import start_grpc
from service.v2.rest import router as v2_routes

log = logging.getLogger("focal.service")


def check_model_folders(specs: list[Path]) -> list[ModelFolder]:
    """Fail fast on folders that cannot be served (before anything is loaded). Each spec is `DIR` or
    `NAME=DIR`; names must differ."""
    if not specs:
        raise ModelLoadError("no model given: pass --model DIR (or FOCAL_MODELS=DIR), a python -m export output folder")
    checked: list[ModelFolder] = []
    for spec in specs:
        name, folder = split_model_spec(spec)
        model = check_model_folder(folder, name)
        same = [c.folder for c in checked if c.name == model.name]
        if same:
            raise ModelLoadError(
                f"{folder} and {same[0]} would both be served as {model.name!r}; name one with --model NAME=DIR"
            )
        checked.append(model)
    return checked


def create_app(settings: Settings, backends: BackendLoader | None = None) -> FastAPI:
    """The app for these settings. `backends` builds each model's backend (default: what the settings
    and the machine call for); tests pass fakes here."""
    state = ServiceState(
        settings=settings,
        metrics=Metrics(),
        preprocess_pool=ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess"),
        planned=check_model_folders(settings.models),
        backends=backends,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        grpc_server = await start_grpc(state) if settings.grpc_port else None  # a taken port fails at once
        loader = asyncio.create_task(_load_models(state), name="load-models")
        try:
            yield
        finally:
            state.begin_draining()
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if grpc_server is not None:  # its running calls finish (they hold leases on the models)
                await grpc_server.stop(state.drain_remaining())
            if state.repository_tasks:  # loads, and replaced or unloaded models finishing their last requests
                await asyncio.wait(state.repository_tasks, timeout=state.drain_remaining())
            remaining = state.drain_remaining()  # the models drain side by side, within one budget
            closed = await asyncio.gather(*(m.close(remaining) for m in state.models.values()), return_exceptions=True)
            for model, outcome in zip(state.models.values(), closed, strict=True):
                if isinstance(outcome, BaseException):
                    log.error("closing %s failed: %s", model.name, outcome)
            state.preprocess_pool.shutdown(wait=False, cancel_futures=True)
            log.info("stopped")

    app = FastAPI(
        title="focal-serve",
        summary="Focal Transformer inference with dynamic batching",
        version="0.1.0",
        lifespan=lifespan,
        responses=error_responses({500: "internal error"}),  # any route, should a bug surface
    )
    app.state.service = state
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics, max_body_bytes=settings.max_body_bytes)
    _add_error_handlers(app)
    # Routes are matched in order: the inference routes first (each route tried costs every request a little)
    for task in TASKS.values():
        app.include_router(task.router)
    app.include_router(v2_routes)
    app.include_router(common_routes)
    return app


async def _load_models(state: ServiceState) -> None:
    """Load and warm up every model in turn; a failure leaves the server failed (not ready, not live)."""
    loop = asyncio.get_running_loop()
    for planned in state.planned:
        health = ModelHealth(health_policy(state.settings))
        try:
            model = await loop.run_in_executor(
                None, ServedModel.load, planned, state.settings, state.metrics, health, state.backends
            )
            state.models[model.name] = model
            await model.warm_up()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            health.failed(f"{type(exc).__name__}: {exc}")
            state.failed = f"{planned.name}: {type(exc).__name__}: {exc}"
            log.error("loading %s from %s failed: %s", planned.name, planned.folder, state.failed)
            return
        announce(state, model)
    state.loading = False


class RequestContextMiddleware:
    """Request id (X-Request-ID in and out), body-size limit, access log and request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        protocol = "v2-http" if is_v2(scope["path"]) else "http"
        request_id = headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        start, status = time.perf_counter(), 500
        limit = self.max_body_bytes
        has_body = scope["method"] in BODY_METHODS  # the other routes never read a body
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise errors.PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        in_progress = self.metrics.in_progress.labels(protocol)
        in_progress.inc()
        try:
            length = headers.get("content-length", "")
            if has_body and length.isdigit() and int(length) > limit:  # refused before reading a byte of it
                error = errors.PayloadTooLarge(f"the request body ({length} bytes) exceeds the limit of {limit} bytes")
                await render_error(scope["path"], error, request_id)(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            in_progress.dec()
            seconds = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in KNOWN_PATHS else "unmatched")
            self.metrics.requests.labels(protocol, endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(protocol, endpoint).observe(seconds)
            if endpoint not in ("/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
                log.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"fields": {"status": status, "duration_ms": round(seconds * 1000, 1)}},
                )
            request_id_var.reset(token)


def is_v2(path: str) -> bool:
    """The Open Inference Protocol's routes (whose errors are `{"error": "..."}`)."""
    return path == "/v2" or path.startswith("/v2/")


def render_error(path: str, error: errors.ServiceError, request_id: str) -> JSONResponse:
    """An error in the shape of the route's protocol; the same status either way."""
    body = {"error": error.message} if is_v2(path) else error.body(request_id)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def error_response(request: Request, error: errors.ServiceError) -> JSONResponse:
    return render_error(request.url.path, error, getattr(request.state, "request_id", ""))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.ServiceError)
    async def service_error(request: Request, exc: errors.ServiceError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('query', 'body'))}: {e.get('msg')}"
            for e in exc.errors()
        )
        return error_response(request, errors.InvalidParameter(details or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = errors.ServiceError(str(exc.detail), headers=dict(exc.headers or {}))
        error.status, error.code = exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(request, error)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        error = errors.ServiceError("the client closed the connection")
        error.status, error.code = 499, "client_closed_request"  # nginx's convention; nobody reads it
        return error_response(request, error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(request, errors.ServiceError(f"internal error ({type(exc).__name__})"))


_HTTP_CODES: dict[int, Any] = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
KNOWN_PATHS = frozenset(task.path for task in TASKS.values())  # metric labels for answers given before routing
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
