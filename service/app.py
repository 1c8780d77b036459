"""App factory: `create_app(settings)` wires settings, models, middleware, error handlers and routes.

Models are checked when the app is created (a bad folder fails at once), then
loaded and warmed up in the background after start-up, so `/healthz` answers
and `/readyz` says 503 ("loading") meanwhile. In a front-end process
(`FOCAL_WORKERS` > 1) the models run in the model host instead, and the app
follows them (`service.remote`). The Open Inference Protocol's gRPC server
(`service.v2.grpc_service`) runs in the same event loop, on its own port.
On shutdown the gRPC server finishes its calls, then each model drains its queue
within the drain budget and closes its backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
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
from service.logs import request_id_var
from service.metrics import Metrics
from service.models import BackendLoader, check_model_folders
from service.remote import HostLink, follow_model_host, host_gone
from service.repository import close_models, load_planned_models
from service.settings import Settings
from service.state import ServiceState
from service.tasks import TASKS
from service.v2.grpc_service import start_grpc
from service.v2.rest import router as v2_routes

log = logging.getLogger("focal.service")


def create_app(
    settings: Settings, backends: BackendLoader | None = None, model_host_socket: str | None = None
) -> FastAPI:
    """The app for these settings. `backends` builds each model's backend (default: what the settings
    and the machine call for); tests pass fakes here. `model_host_socket`: this app is one of several
    front-end processes (`FOCAL_WORKERS` > 1) and its models run in the model host behind this socket."""
    state = ServiceState(
        settings=settings,
        metrics=Metrics(),
        preprocess_pool=ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess"),
        planned=check_model_folders(settings.models),
        backends=backends,
        model_host_socket=model_host_socket,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _drain_on_signal(state)
        grpc_server = await start_grpc(state) if settings.grpc_port else None  # a taken port fails at once
        link = HostLink(model_host_socket, functools.partial(host_gone, state)) if model_host_socket else None
        if link is None:
            loader = asyncio.create_task(load_planned_models(state), name="load-models")
        else:
            loader = asyncio.create_task(follow_model_host(state, link), name="follow-model-host")
        try:
            yield
        finally:
            state.begin_draining()
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if grpc_server is not None:  # its running calls finish (they hold leases on the models)
                await grpc_server.stop(state.drain_remaining())
            await close_models(state)
            if link is not None:
                await link.close()
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


def _drain_on_signal(state: ServiceState) -> None:
    """Readiness turns false the moment SIGTERM or SIGINT arrives, before uvicorn's graceful shutdown
    (which closes the listener, then waits for the requests in flight) reaches the lifespan. Wraps the
    handler uvicorn installed while it serves; only where uvicorn runs the app (the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if callable(previous) and previous not in (signal.default_int_handler,):

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                state.begin_draining()
                previous(signum, frame)

            signal.signal(sig, handler)


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
