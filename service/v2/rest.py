"""The Open Inference Protocol (KServe v2) over REST, on the service's HTTP port.

Server and model metadata, model readiness, inference (JSON tensors and Triton's binary tensor
data extension: `Inference-Header-Content-Length`, `binary_data_size`, `binary_data`,
`binary_data_output`) and Triton's model repository extension (index, load, unload; behind
`FOCAL_ADMIN_TOKEN`). Errors are `{"error": "..."}` with the same status codes as `/classify`
(`service.app.render_error`). The health routes `/v2/health/live` and `/v2/health/ready` are
the server's probes (`service.api`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from service import errors, inference, repository
from service.api import State, client_gone, error_responses
from service.v2 import core, tensors

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])

HEADER_LENGTH = "Inference-Header-Content-Length"
PARSE_OFF_LOOP_BYTES = 256 * 1024
_ERRORS = error_responses(
    {
        400: "malformed request, tensor or image",
        404: "no such model (or version) is loaded",
        413: "body, image pixel count or number of images over the limit",
        415: "compressed body (Content-Encoding)",
        422: "bad task parameters (score_threshold, max_detections)",
        429: "queue full (Retry-After)",
        500: "the backend failed on this request's batch",
        503: "the model is loading, or the server is shutting down (Retry-After)",
        504: "deadline passed while queued",
    }
)


class _Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    binary_data_size: int | None = Field(None, ge=0)
    binary_data: bool | None = None


class _Input(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: _Parameters = Field(default_factory=_Parameters)
    data: Any = None


class _Output(BaseModel):
    name: str
    parameters: _Parameters = Field(default_factory=_Parameters)


class InferRequestBody(BaseModel):
    """The JSON part of an inference request (after it, with the binary extension: the tensors' bytes)."""

    id: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Input] = Field(min_length=1, max_length=core.MAX_INPUTS)
    outputs: list[_Output] | None = Field(None, max_length=core.MAX_OUTPUTS)


def _parse_infer(body: bytes, header_length: str | None, max_images: int) -> tuple[core.InferRequest, bool]:
    """The request, and whether outputs are binary unless an output says otherwise. `max_images`: the
    most `BYTES` elements an input may have (checked before any is decoded)."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise errors.BadRequest(f"{HEADER_LENGTH}: {header_length!r} is not a length within the body")
        split = int(header_length)
        head, binary = body[:split], memoryview(body)[split:]
    else:
        head, binary = body, memoryview(b"")
    try:
        parsed = InferRequestBody.model_validate_json(head)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
        raise errors.BadRequest(f"malformed inference request: {problems}") from None
    inputs, offset = [], 0
    try:
        for given in parsed.inputs:
            size = given.parameters.binary_data_size
            if size is not None:
                if offset + size > len(binary):
                    raise errors.BadRequest(f"input {given.name!r}: binary_data_size {size} runs past the body's end")
                raw = bytes(binary[offset : offset + size])
                offset += size
                array = tensors.from_raw(given.name, given.datatype, given.shape, raw, max_images)
            elif given.data is None:
                raise errors.BadRequest(f"input {given.name!r} has neither 'data' nor a binary_data_size")
            else:
                array = tensors.from_json(given.name, given.datatype, given.shape, given.data, max_images)
            inputs.append(core.InputTensor(given.name, given.datatype, array))
    except tensors.TooManyElements as exc:
        raise errors.PayloadTooLarge(str(exc)) from None
    except tensors.TensorError as exc:
        raise errors.BadRequest(str(exc)) from None
    if offset != len(binary):
        raise errors.BadRequest(f"{len(binary) - offset} bytes after the last binary input belong to no input")
    outputs = None
    if parsed.outputs:
        outputs = [core.RequestedOutput(o.name, o.parameters.binary_data) for o in parsed.outputs]
    binary_default = parsed.parameters.get("binary_data_output") is True
    task_parameters, timeout_s = core.split_parameters(parsed.parameters)
    return core.InferRequest(inputs, outputs, task_parameters, parsed.id, timeout_s), binary_default


def _infer_response(
    model_name: str, version: str, request: core.InferRequest, binary_default: bool, results: list[tuple[str, Any]]
) -> Response:
    binary_by_name = {o.name: o.binary for o in request.outputs or []}
    outputs, chunks = [], []
    for name, array in results:
        entry: dict[str, Any] = {"name": name, "datatype": tensors.datatype_of(array), "shape": list(array.shape)}
        binary = binary_by_name.get(name)
        if binary if binary is not None else binary_default:
            raw = tensors.to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = tensors.to_json(array)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if request.id:
        body["id"] = request.id
    head = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


# -- inference ---------------------------------------------------------------------------------
_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InferRequestBody.model_json_schema()},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"binary tensor data extension: the JSON request ({HEADER_LENGTH} bytes), "
                "then each binary input's bytes",
            },
        },
    }
}


@router.post("/models/{name}/infer", summary="Inference", responses=_ERRORS, openapi_extra=_INFER_BODY)
@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference on one version",
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
)
async def infer(
    request: Request,
    state: State,
    name: str,
    version: str | None = None,
) -> Response:
    with state.model_named(name, version).lease() as model:
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise errors.UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted; send it uncompressed")
        inference.admit(state, model)  # before reading the body
        body, header = await request.body(), request.headers.get(HEADER_LENGTH)
        limit = state.settings.max_images_per_request
        if len(body) > PARSE_OFF_LOOP_BYTES:  # a large JSON tensor takes a while to parse: not on the event loop
            (parsed, binary_default), *_ = await inference.off_loop(
                state, lambda _: _parse_infer(body, header, limit), [None]
            )
        else:
            parsed, binary_default = _parse_infer(body, header, limit)
        try:
            results = await core.infer(state, model, parsed, gone=functools.partial(client_gone, request))
        except inference.ClientGone:
            raise ClientDisconnect() from None
        return _infer_response(model.name, model.version, parsed, binary_default, results)


# -- server and model metadata, readiness ------------------------------------------------------
@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return core.server_metadata()


@router.get("/models/{name}", summary="Model metadata: platform, inputs, outputs", responses=_ERRORS)
@router.get("/models/{name}/versions/{version}", summary="Model metadata of one version", responses=_ERRORS)
async def model_metadata(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    return core.model_metadata(state.model_named(name, version))


@router.get("/models/{name}/ready", summary="Whether the model takes requests", responses=_ERRORS)
@router.get("/models/{name}/versions/{version}/ready", summary="Whether this version takes requests", responses=_ERRORS)
async def model_ready(state: State, name: str, version: str | None = None) -> dict[str, Any]:
    model = state.model_named(name, version)
    ready, detail = model.health.readiness()
    if not ready:  # clients read readiness from the status code (tritonclient: 200 or not)
        raise errors.Unavailable(f"model {model.name} is not ready: {detail}")
    return {"name": model.name, "version": model.version, "ready": True}


# -- model repository (Triton's extension) -----------------------------------------------------
_ADMIN_ERRORS = error_responses(
    {
        400: "the folder cannot be served, or the model failed to load",
        401: "missing or wrong bearer token",
        403: "the repository API is off (FOCAL_ADMIN_TOKEN unset)",
        404: "unknown model",
        501: "several front-end processes (FOCAL_WORKERS > 1): the models cannot be changed while serving",
        503: "the server is shutting down",
    }
)


class IndexRequest(BaseModel):
    ready: bool = Field(False, description="only the models ready to serve")


class LoadRequest(BaseModel):
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="'folder': the export folder to serve as this name (default: the folder it was served from)",
    )


async def _json_body(request: Request, schema: type[BaseModel]) -> Any:
    body = await request.body()
    try:
        return schema.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise errors.BadRequest(f"malformed request body: {exc.errors()[0]['msg']}") from None


@router.post("/repository/index", summary="Every model this server knows, and its state", responses=_ADMIN_ERRORS)
async def repository_index(
    request: Request, state: State, authorization: Annotated[str | None, Header()] = None
) -> JSONResponse:
    repository.check_admin(state.settings, authorization)
    query: IndexRequest = await _json_body(request, IndexRequest)
    return JSONResponse(repository.index(state, ready_only=query.ready))


@router.post(
    "/repository/models/{name}/load",
    summary="Load a model, or switch it to another export folder without failing a request",
    responses=_ADMIN_ERRORS,
)
async def repository_load(
    request: Request, state: State, name: str, authorization: Annotated[str | None, Header()] = None
) -> dict[str, Any]:
    repository.check_admin(state.settings, authorization)
    body: LoadRequest = await _json_body(request, LoadRequest)
    folder = body.parameters.get("folder")
    if folder is not None and not isinstance(folder, str):
        raise errors.BadRequest("parameters.folder must be a path")
    model = await repository.load_model(state, name, Path(folder) if folder else None)
    return {"name": model.name, "version": model.version, "state": "READY"}


@router.post("/repository/models/{name}/unload", summary="Stop serving a model", responses=_ADMIN_ERRORS)
async def repository_unload(
    request: Request, state: State, name: str, authorization: Annotated[str | None, Header()] = None
) -> dict[str, Any]:
    repository.check_admin(state.settings, authorization)
    await repository.unload_model(state, name)
    return {"name": name, "state": "UNAVAILABLE"}
