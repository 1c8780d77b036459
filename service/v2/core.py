"""The Open Inference Protocol's semantics, once for REST (`service.v2.rest`) and gRPC
(`service.v2.grpc_service`): server and model metadata, and inference.

Each model accepts one of two inputs per request, both listed in its metadata:

- the model input itself, named as in the manifest (`pixels`): `FP32 [N, 3, H, W]`, already
  normalised as the manifest's `preprocess` block describes; or, for an export whose graph
  normalises (`preprocess.normalise: graph`, the default for classifiers), `UINT8 [N, 3, H, W]`,
  the resized RGB pixels as they are;
- `image_bytes`, `BYTES [N]`: encoded images (JPEG, PNG, ...), decoded and transformed exactly
  as `/classify` and `/detect` do, so the numbers are the same.

The outputs are the task's (`ServiceTask.protocol`): a classifier's `logits` and
`probabilities`, a detector's `detections` and `num_detections`. Every request goes through
`service.inference`: the same admission, queue, batcher, deadline and errors as `/classify`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from service import errors, inference
from service.state import ServiceState
from service.tasks import ModelInput, Placed, TensorMeta
from service.v2.tensors import BYTES

if TYPE_CHECKING:
    from service.models import Model

SERVER_NAME = "focal-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
IMAGE_INPUT = "image_bytes"
MAX_INPUTS, MAX_OUTPUTS = 4, 8  # a request sends one input; more are refused before any is decoded
# Triton's request parameters: `timeout` (microseconds) bounds the deadline; the others mean nothing
# to a stateless image model and are ignored
RESERVED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch_torch"}


@dataclass
class InputTensor:
    name: str
    datatype: str
    array: np.ndarray  # already in the declared shape and datatype (`service.v2.tensors`)


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # REST only: None leaves it to the request's `binary_data_output`


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None  # None: every output
    parameters: Mapping[str, Any] = field(default_factory=dict)  # the task's (reserved ones removed)
    id: str = ""
    timeout_s: float | None = None  # the request's own deadline, if it gave one


def split_parameters(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], float | None]:
    """A request's parameters -> the task's, and the `timeout` parameter (microseconds) in seconds."""
    timeout_us = parameters.get("timeout")
    valid = isinstance(timeout_us, int | float) and not isinstance(timeout_us, bool) and timeout_us > 0
    task = {k: v for k, v in parameters.items() if k not in RESERVED_PARAMETERS}
    return task, (float(timeout_us) / 1e6 if valid else None)  # type: ignore[arg-type]


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


INPUT_DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}  # manifest dtype -> protocol datatype


def model_inputs(model: Model) -> list[TensorMeta]:
    spec = model.manifest.input
    # Several input sizes (a detector's canvases): any height and width, checked against them in `_one_input`.
    shapes = model.input_shapes
    shape = [-1, *shapes[0]] if len(shapes) == 1 else [-1, shapes[0][0], -1, -1]
    return [
        TensorMeta(spec.name, INPUT_DATATYPES[spec.dtype], shape),
        TensorMeta(IMAGE_INPUT, BYTES, [-1]),
    ]


def model_metadata(model: Model) -> dict[str, Any]:
    def listed(tensors: list[TensorMeta]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in tensors]

    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORMS.get(model.info()["backend"], model.info()["backend"]),
        "inputs": listed(model_inputs(model)),
        "outputs": listed(model.task.protocol.outputs(model.manifest)),
    }


async def infer(
    state: ServiceState,
    model: Model,
    request: InferRequest,
    timeout_s: float | None = None,
    gone: Callable[[], Awaitable[None]] | None = None,
) -> list[tuple[str, np.ndarray]]:
    """The requested outputs (every output when none are named), each with the batch axis first."""
    protocol = model.task.protocol
    declared = [t.name for t in protocol.outputs(model.manifest)]
    wanted = [o.name for o in request.outputs] if request.outputs else declared
    unknown = [name for name in wanted if name not in declared]
    if unknown:
        raise errors.BadRequest(f"unknown output {unknown[0]!r}; {model.name} has {', '.join(declared)}")
    parameters = protocol.parameters(model, request.parameters)
    tensor = _one_input(model, request.inputs)
    inference.admit(state, model)
    placed: Sequence[Placed]
    if tensor.name == IMAGE_INPUT:
        blobs = [bytes(b) for b in tensor.array.reshape(-1)]
        inference.check_image_count(state, len(blobs))
        placed = await inference.prepare(state, model, blobs)
    else:
        inference.check_image_count(state, len(tensor.array))
        placed = [ModelInput(s) for s in tensor.array.astype(model.manifest.input.dtype, copy=False)]
    samples = [p.pixels for p in placed]
    deadlines = [t for t in (timeout_s, request.timeout_s) if t is not None]
    rows = await inference.infer(state, model, samples, min(deadlines) if deadlines else None, gone)

    def finish(i: int) -> dict[str, np.ndarray]:
        return protocol.finish(model, rows[i], placed[i], parameters)

    if protocol.finish_blocks:
        per_image = await inference.off_loop(state, finish, range(len(rows)))
    else:
        per_image = [finish(i) for i in range(len(rows))]
    return [(name, np.stack([image[name] for image in per_image])) for name in wanted]


def _one_input(model: Model, inputs: list[InputTensor]) -> InputTensor:
    accepted = {t.name: t for t in model_inputs(model)}
    names = " or ".join(repr(n) for n in accepted)
    if len(inputs) != 1:
        raise errors.BadRequest(f"send exactly one input ({names}), not {len(inputs)}")
    tensor = inputs[0]
    spec = accepted.get(tensor.name)
    if spec is None:
        raise errors.BadRequest(f"unknown input {tensor.name!r}; {model.name} accepts {names}")
    if tensor.datatype != spec.datatype:
        raise errors.BadRequest(f"input {tensor.name!r} must be {spec.datatype}, not {tensor.datatype}")
    shape = list(tensor.array.shape)
    if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)):
        raise errors.BadRequest(f"input {tensor.name!r} has shape {shape}; {model.name} takes {spec.shape}")
    if tensor.name != IMAGE_INPUT and tuple(shape[1:]) not in model.input_shapes:
        sizes = ", ".join(f"{s[-2]}x{s[-1]}" for s in model.input_shapes)
        raise errors.BadRequest(f"input {tensor.name!r} has shape {shape}; {model.name}'s canvases are {sizes}")
    return tensor
