"""TensorRT engine build, written against the documented Python API of TensorRT 10 and 11.

Kept small and isolated: nothing else in the project imports `tensorrt`. It
cannot run on machines without TensorRT and a CUDA GPU (CI has neither); there
`probe()` says why and the export records that reason instead of an engine.

- TensorRT 10 has `BuilderFlag.FP16`: an fp16 engine is built from the fp32 ONNX
  with that flag, with LayerNorm and Softmax layers constrained to fp32, and in a
  detector every floating-point layer after the TopK too (box decoding), as the
  fp16 ONNX has it.
- TensorRT 11 removed the flag (networks are strongly typed): an fp16 engine is
  built from the fp16 ONNX, whose casts already keep LayerNorm/Softmax in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class EngineError(Exception):
    """The engine could not be built."""


@dataclass(frozen=True)
class TensorRTProbe:
    available: bool
    reason: str | None = None
    tensorrt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None


def probe() -> TensorRTProbe:
    """Whether an engine can be built here, and on what (GPU queried with cuda-python, else torch)."""
    try:
        import tensorrt as trt
    except ImportError:
        return TensorRTProbe(False, "TensorRT is not installed (Python package 'tensorrt')")
    gpu = _first_gpu()
    if isinstance(gpu, str):
        return TensorRTProbe(False, gpu, tensorrt_version=trt.__version__)
    name, capability = gpu
    return TensorRTProbe(True, tensorrt_version=trt.__version__, gpu_name=name, compute_capability=capability)


def _first_gpu() -> tuple[str, str] | str:
    """(name, compute capability) of GPU 0, or why there is none."""
    try:
        from cuda.bindings import runtime as cudart

        error, count = cudart.cudaGetDeviceCount()
        if int(error) != 0 or count < 1:
            return "no CUDA GPU is visible"
        error, props = cudart.cudaGetDeviceProperties(0)
        if int(error) != 0:
            return f"cannot query the GPU (CUDA error {error})"
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return name.strip("\x00"), f"{props.major}.{props.minor}"
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        return "neither cuda-python nor torch is installed to query the GPU"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (to torch; install cuda-python to query CUDA directly)"
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def build_engine(
    *,
    fp32_onnx: Path,
    fp16_onnx: Path | None,
    engine_path: Path,
    input_name: str,
    input_shape: tuple[int, int, int],
    batch: tuple[int, int, int],
    workspace_bytes: int,
    timing_cache: Path | None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build and serialise an engine with one optimisation profile over the batch axis."""
    import tensorrt as trt

    fp16 = fp16_onnx is not None
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    strongly_typed = fp16 and not has_fp16_flag
    source = fp16_onnx if strongly_typed and fp16_onnx is not None else fp32_onnx

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {source.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16 and has_fp16_flag:  # TensorRT 10: mixed precision by flag, LayerNorm/Softmax pinned to fp32
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in pinned:
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
        for layer in _detection_tail(trt, network):
            floats = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in (trt.float32, trt.float16)]
            if floats and layer.type != trt.LayerType.CAST:  # a Cast's output type is its own business
                layer.precision = trt.float32
                for j in floats:
                    layer.set_output_type(j, trt.float32)

    lo, opt, hi = batch
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (lo, *input_shape), (opt, *input_shape), (hi, *input_shape))
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"invalid optimisation profile for batch {lo}/{opt}/{hi}")

    save_cache = False
    if timing_cache is not None:
        previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
        accepted = config.set_timing_cache(config.create_timing_cache(previous), ignore_mismatch=False)
        if previous and not accepted:  # made on another GPU type or TensorRT: keep it for its owner
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
            log(f"timing cache {timing_cache} is from another GPU or TensorRT version: not used, not overwritten")
        else:
            save_cache = True
            log(f"timing cache {timing_cache} ({'reused' if previous else 'new'})")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None and save_cache:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "built_from": source.name,
        "strongly_typed": strongly_typed,
        "fp16_flag": fp16 and has_fp16_flag,
    }


def _detection_tail(trt: Any, network: Any) -> list[Any]:
    """The TopK layers, the layers they feed (directly or not) and the constants those read:
    a detector's selection and box decoding.

    Layers are listed in the order the parser added them, which is the ONNX graph's
    topological order."""
    tainted: set[str] = set()
    constants: dict[str, Any] = {}
    tail: list[Any] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = [t.name for t in (layer.get_input(j) for j in range(layer.num_inputs)) if t is not None]
        outputs = {layer.get_output(j).name for j in range(layer.num_outputs)}
        if layer.type == trt.LayerType.CONSTANT:
            constants.update(dict.fromkeys(outputs, layer))
        elif layer.type == trt.LayerType.TOPK or any(name in tainted for name in inputs):
            tainted |= outputs
            tail.extend(constants.pop(name) for name in inputs if name in constants)
            tail.append(layer)
    return tail
