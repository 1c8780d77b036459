"""uint8 input: the served graphs take the image's RGB bytes and normalise them themselves.

`with_uint8_input(graph, mean, std)` puts three nodes in front of a graph whose input is the
normalised float32 image: Cast (uint8 -> float32), then Mul by 1 / (255 std) and Add -mean / std,
per channel, in float32 (an fp16 graph's own Cast to fp16 follows them; an int8 graph's first
layers are untouched). The host then sends the resized and cropped pixels as they are,
`uint8 [N, 3, H, W]`: no float conversion on the CPU, a 4x smaller sample to move between
processes and to the GPU. TensorRT takes UINT8 only as a network input or output, followed by a
Cast (supported in 10.x and 11.x), which is exactly this graph's one use of it.

Each served graph gets the same prefix, and each is verified against its float-input self on the
same images normalised the host's way (`verify_uint8_input`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.verify import FP32_RELATIVE_TOLERANCE, VerificationError, max_abs_diff_and_scale, run_onnx

SCALE, SHIFT = "uint8_input_scale", "uint8_input_shift"
VERIFY_SEED = 20211112


def with_uint8_input(graph: onnx.ModelProto, mean: tuple[float, ...], std: tuple[float, ...]) -> onnx.ModelProto:
    """A copy of `graph` (one float32 NCHW input) whose input is uint8 and normalised in the graph."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    (given,) = model.graph.input
    if given.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"input {given.name!r} is not float32")
    name, normalised = given.name, f"{given.name}_normalised"
    for node in model.graph.node:
        for i, used in enumerate(node.input):
            if used == name:
                node.input[i] = normalised
    std_a = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1)
    mean_a = np.asarray(mean, dtype=np.float64).reshape(1, 3, 1, 1)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array((1.0 / (255.0 * std_a)).astype(np.float32), SCALE),
            numpy_helper.from_array((-mean_a / std_a).astype(np.float32), SHIFT),
        ]
    )
    prefix = [
        helper.make_node("Cast", [name], [f"{name}_float"], to=TensorProto.FLOAT, name="uint8_input_cast"),
        helper.make_node("Mul", [f"{name}_float", SCALE], [f"{name}_scaled"], name="uint8_input_scale"),
        helper.make_node("Add", [f"{name}_scaled", SHIFT], [normalised], name="uint8_input_shift"),
    ]
    for node in reversed(prefix):
        model.graph.node.insert(0, node)
    given.type.tensor_type.elem_type = TensorProto.UINT8
    onnx.checker.check_model(model)
    return model


def uint8_images(size: tuple[int, int], batches: tuple[int, ...] = (1, 3)) -> dict[int, np.ndarray]:
    """Image-like uint8 inputs per batch size: smooth gradients plus noise, with 0 and 255 reached."""
    rng = np.random.default_rng(VERIFY_SEED)
    h, w = size
    ramp = np.linspace(0.0, 255.0, h * w).reshape(1, 1, h, w)
    images = {}
    for batch in batches:
        noisy = ramp * rng.uniform(0.2, 1.2, size=(batch, 3, 1, 1)) + rng.normal(0, 60, size=(batch, 3, h, w))
        images[batch] = np.clip(noisy, 0, 255).astype(np.uint8)
    return images


def normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """What the host does for a float-input graph (`service.tasks`): /255, then (x - mean) / std, float32."""
    shape = (1, 3, 1, 1)
    pixels = images.astype(np.float32) / np.float32(255.0)
    return np.asarray(
        (pixels - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape),
        dtype=np.float32,
    )


def verify_uint8_input(
    float_graph: onnx.ModelProto | Path,
    uint8_graph: onnx.ModelProto | Path,
    size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    tolerance: float = FP32_RELATIVE_TOLERANCE,
) -> dict[str, float]:
    """The uint8-input graph on image bytes against the float-input graph on the same images normalised
    on the host: every output within `tolerance` of its scale, else VerificationError. (The inputs differ
    by float32 rounding only; an fp16 or int8 graph turns that into larger steps, so it gets a wider bound.)"""
    images = uint8_images(size)
    expected = run_onnx(float_graph, {b: normalise(x, mean, std) for b, x in images.items()})
    got = run_onnx(uint8_graph, images)
    worst = max_diff = 0.0
    for i in range(len(next(iter(expected.values())))):
        diff, scale = max_abs_diff_and_scale([e[i] for e in expected.values()], [g[i] for g in got.values()])
        worst, max_diff = max(worst, diff / max(scale, 1e-12)), max(max_diff, diff)
    if worst > tolerance:
        raise VerificationError(
            f"the uint8-input graph differs from the float-input one by {worst:.3g} of the output scale "
            f"(limit {tolerance}); export with --no-uint8-input"
        )
    return {"max_abs_diff": max_diff, "relative_diff": worst, "limit": tolerance, "samples": float(sum(images))}
