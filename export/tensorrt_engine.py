"""TensorRT engine build, written against the documented Python API of TensorRT 10 and 11.

Kept small and isolated: nothing else in the project imports `tensorrt`. It
cannot run on machines without TensorRT and a CUDA GPU (CI has neither); there
`probe()` says why and the export records that reason instead of an engine.

- Every engine is built **strongly typed** from the ONNX the export verified: the
  fp16 ONNX for an fp16 engine (its casts keep LayerNorm, Softmax and a detector's
  box decoding in fp32), the fp32 ONNX otherwise. So the engine computes in the
  types the verification checked, on TensorRT 10.4+ (the `STRONGLY_TYPED` network
  flag) and 11 (always strongly typed) alike. Older TensorRT is refused: its only
  fp16 path, `BuilderFlag.FP16` with per-layer fp32 pins, does not guarantee the pins.
- TF32 is cleared, so fp32 layers compute in fp32 (the manifest's `engine.tf32`).
- The timing cache is an optimisation only: a damaged, foreign or refused cache
  falls back to an empty one with a warning and never fails a build.
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
    reason = _unsupported(trt)
    if reason:
        return TensorRTProbe(
            False, reason, tensorrt_version=trt.__version__, gpu_name=name, compute_capability=capability
        )
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
    """Build and serialise an engine with one optimisation profile over the batch axis, strongly
    typed from the ONNX the export verified (the fp16 one for an fp16 engine), TF32 off."""
    import tensorrt as trt

    reason = _unsupported(trt)
    if reason:
        raise EngineError(reason)
    source = fp16_onnx if fp16_onnx is not None else fp32_onnx
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {source.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    tf32 = False
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default: fp32 matmuls and convolutions would run as TF32
        config.clear_flag(trt.BuilderFlag.TF32)

    lo, opt, hi = batch
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (lo, *input_shape), (opt, *input_shape), (hi, *input_shape))
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"invalid optimisation profile for batch {lo}/{opt}/{hi}")

    save_cache = _use_timing_cache(config, timing_cache, log) if timing_cache is not None else False
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None and save_cache:
        try:
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
        except Exception as exc:  # a cache is an optimisation: never fail a finished build over it
            log(f"warning: timing cache {timing_cache} not saved ({type(exc).__name__}: {exc})")
    return {"built_from": source.name, "strongly_typed": True, "fp16_flag": False, "tf32": tf32}


def _unsupported(trt: Any) -> str | None:
    """Why this TensorRT cannot build this project's engines (None: it can)."""
    if not hasattr(trt.BuilderFlag, "FP16"):  # 11+: every network is strongly typed (the flag may go too)
        return None
    if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return (
            f"TensorRT {trt.__version__} has no strongly typed networks (TensorRT 10.4 added them); "
            "install tensorrt-cu12>=10.4"
        )
    return None


def _strongly_typed_flags(trt: Any) -> int:
    """`create_network`'s flags for a strongly typed network. TensorRT 11 has no other kind: there the
    flag is renumbered (0) and ignored, so no flag is set."""
    if not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11: weak typing is gone with the precision flags
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _use_timing_cache(config: Any, path: Path, log: Callable[[str], None]) -> bool:
    """Give the build the cache in `path` (or an empty one); True when the cache may be saved back.

    A corrupt or other-version file can make `create_timing_cache` return None, and
    `set_timing_cache` says False for a cache from another GPU type: both fall back to an empty
    cache with a warning (a cache that is not ours is left as it is). Never fails the build."""
    try:
        previous = path.read_bytes() if path.is_file() else b""
    except OSError as exc:
        log(f"warning: timing cache {path} unreadable ({exc}): building without it")
        return False
    try:
        cache = config.create_timing_cache(previous) if previous else None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            log(f"timing cache {path} (reused)")
            return True
        if previous:
            why = "unreadable (damaged, or another TensorRT version)" if cache is None else "from another GPU type"
            log(f"warning: timing cache {path} is {why}: building with an empty cache; the file is left as it is")
        empty = config.create_timing_cache(b"")
        if empty is None or not config.set_timing_cache(empty, ignore_mismatch=False):
            log("warning: TensorRT refused an empty timing cache: building without one")
            return False
        if not previous:
            log(f"timing cache {path} (new)")
        return not previous  # a foreign or damaged file is not overwritten
    except Exception as exc:
        log(f"warning: timing cache {path} not used ({type(exc).__name__}: {exc})")
        return False
