"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService`, served with
`grpc.aio` in the HTTP app's event loop (same batchers, limits, leases and drain), on
`FOCAL_GRPC_PORT`; and `grpc.health.v1.Health` on the same port for probes.

The service and message classes are the ones `tritonclient.grpc` ships (generated from
Triton's `grpc_service.proto`, package `inference`: KServe v2's service plus Triton's
extensions). This server implements ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelInfer and the model repository (RepositoryIndex, RepositoryModelLoad,
RepositoryModelUnload); the rest answer UNIMPLEMENTED.

- Errors map to status codes: 400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, 413 and 429 ->
  RESOURCE_EXHAUSTED, 503 -> UNAVAILABLE, 504 -> DEADLINE_EXCEEDED, 401 -> UNAUTHENTICATED,
  403 -> PERMISSION_DENIED.
- The call's deadline is the request's deadline (at most `FOCAL_REQUEST_TIMEOUT_S`); a
  cancelled call takes its images out of the queue.
- Messages are bounded by `FOCAL_MAX_BODY_BYTES`, as HTTP bodies are.
- Health: service "" or "ready" is readiness, "live" is liveness (Kubernetes' gRPC probes).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service import errors, repository
from service.state import ServiceState
from service.v2 import core, tensors

log = logging.getLogger("focal.service")

STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# InferTensorContents' field for each datatype (FP16 has none: raw contents only)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

Request = TypeVar("Request")
Reply = TypeVar("Reply")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Reply]]


def _rpc(method: Handler[Request, Reply]) -> Handler[Request, Reply]:
    """Errors as gRPC status codes, and the request metrics (protocol "v2-grpc")."""

    @functools.wraps(method)
    async def handle(self: InferenceServicer, request: Request, context: grpc.aio.ServicerContext) -> Reply:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        in_progress = self.state.metrics.in_progress.labels("v2-grpc")
        in_progress.inc()
        try:
            return await method(self, request, context)
        except errors.ServiceError as exc:
            code = STATUS.get(exc.status, grpc.StatusCode.INTERNAL)
            if exc.status >= 500 and code is grpc.StatusCode.INTERNAL:
                log.error("%s: %s", exc.code, exc.message)
            await context.abort(code, exc.message)
            raise  # abort raised already; this keeps type checkers content
        except BaseException as exc:
            if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s", method.__name__)
                await context.abort(code, f"internal error ({type(exc).__name__})")
            if code is grpc.StatusCode.OK:  # cancelled: by the client, or by the call's deadline
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        finally:
            in_progress.dec()
            metrics = self.state.metrics
            metrics.requests.labels("v2-grpc", method.__name__, code.name).inc()
            metrics.request_seconds.labels("v2-grpc", method.__name__).observe(time.perf_counter() - start)

    return handle


def _parameter(value: Any) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def _input_array(given: Any, raw: bytes | None, max_bytes_elements: int) -> np.ndarray:
    if raw is not None:
        return tensors.from_raw(given.name, given.datatype, list(given.shape), raw, max_bytes_elements)
    shape = tensors.check_shape(given.name, list(given.shape), given.datatype, max_bytes_elements)
    if given.datatype == tensors.BYTES:
        values = np.empty(len(given.contents.bytes_contents), dtype=np.object_)
        if values.size <= max_bytes_elements:
            values[:] = list(given.contents.bytes_contents)
    else:
        field = CONTENTS.get(given.datatype)
        if field is None:
            raise tensors.TensorError(f"input {given.name!r}: {given.datatype} data must be sent as raw contents")
        try:
            values = np.asarray(getattr(given.contents, field), dtype=tensors.DTYPES[given.datatype])
        except OverflowError as exc:
            raise tensors.TensorError(f"input {given.name!r}: {exc}") from None
    if values.size != math.prod(shape):
        raise tensors.TensorError(f"input {given.name!r}: {values.size} elements for shape {list(shape)}")
    return tensors.reshape(given.name, values, shape)


def parse_infer_request(request: Any, max_images: int) -> core.InferRequest:
    """A `ModelInferRequest` -> the protocol-neutral request. `max_images`: the most `BYTES` elements."""
    if len(request.inputs) > core.MAX_INPUTS or len(request.outputs) > core.MAX_OUTPUTS:
        raise errors.BadRequest(f"at most {core.MAX_INPUTS} inputs and {core.MAX_OUTPUTS} outputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise errors.BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    try:
        inputs = [
            core.InputTensor(given.name, given.datatype, _input_array(given, raw[i] if raw else None, max_images))
            for i, given in enumerate(request.inputs)
        ]
    except tensors.TooManyElements as exc:
        raise errors.PayloadTooLarge(str(exc)) from None
    except tensors.TensorError as exc:
        raise errors.BadRequest(str(exc)) from None
    parameters, timeout_s = core.split_parameters({k: _parameter(v) for k, v in request.parameters.items()})
    outputs = [core.RequestedOutput(o.name) for o in request.outputs] or None
    return core.InferRequest(inputs, outputs, parameters, request.id, timeout_s)


def _tensor_metadata(entries: list[dict[str, Any]]) -> list[Any]:
    return [pb.ModelMetadataResponse.TensorMetadata(**entry) for entry in entries]


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return next((str(v) for k, v in context.invocation_metadata() or () if k == "authorization"), None)


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, state: ServiceState) -> None:
        self.state = state

    @_rpc
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self.state.liveness()[0])

    @_rpc
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.state.readiness()[0])

    @_rpc
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            model = self.state.model_named(request.name, request.version or None)
        except errors.ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=model.health.readiness()[0])

    @_rpc
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(**core.server_metadata())

    @_rpc
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = core.model_metadata(self.state.model_named(request.name, request.version or None))
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=_tensor_metadata(meta["inputs"]),
            outputs=_tensor_metadata(meta["outputs"]),
        )

    @_rpc
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        state = self.state
        with state.model_named(request.model_name, request.model_version or None).lease() as model:
            parsed = parse_infer_request(request, state.settings.max_images_per_request)
            results = await core.infer(state, model, parsed, context.time_remaining())  # the call's deadline
            response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=parsed.id)
            for name, array in results:
                response.outputs.add(name=name, datatype=tensors.datatype_of(array), shape=list(array.shape))
                response.raw_output_contents.append(tensors.to_raw(array))
            return response

    # -- model repository ----------------------------------------------------------------------
    @_rpc
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        repository.check_admin(self.state.settings, _authorization(context))
        entries = repository.index(self.state, ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        repository.check_admin(self.state.settings, _authorization(context))
        folder = request.parameters["folder"].string_param if "folder" in request.parameters else ""
        await repository.load_model(self.state, request.model_name, Path(folder) if folder else None)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        repository.check_admin(self.state.settings, _authorization(context))
        await repository.unload_model(self.state, request.model_name)
        return pb.RepositoryModelUnloadResponse()


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1: "" or "ready" answers readiness, "live" liveness."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        probes = {"": self.state.readiness, "ready": self.state.readiness, "live": self.state.liveness}
        probe = probes.get(request.service)
        if probe is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}: use live or ready")
        assert probe is not None
        serving = health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse(
            status=serving if probe()[0] else health_pb2.HealthCheckResponse.NOT_SERVING
        )


async def start_grpc(state: ServiceState) -> grpc.aio.Server:
    """The gRPC server on `FOCAL_HOST:FOCAL_GRPC_PORT`, started (RuntimeError if the port is taken)."""
    settings = state.settings
    limit = settings.max_body_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
            # a port in use fails here instead of being shared silently; several front-end processes
            # (FOCAL_WORKERS > 1) share it on purpose (service.workers checked it free first)
            ("grpc.so_reuseport", 1 if state.front_end else 0),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(state), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"gRPC cannot listen on {address}: {exc}") from None
    if not bound:
        raise RuntimeError(f"gRPC cannot listen on {address} (in use?)")
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    return server
