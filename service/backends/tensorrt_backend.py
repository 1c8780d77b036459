"""TensorRT engine backend, written against the TensorRT 10/11 Python API and cuda-python.

It cannot run where there is no TensorRT or GPU (CI): nothing imports it
unless the manifest has an engine. An engine only runs with the TensorRT
version and GPU type it was built for; a mismatch is refused with the
command that rebuilds it here.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from service.backends import BackendUnavailable


def _check(result: Any) -> Any:
    """cuda-python calls return (error, value...); raise on error, return the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise BackendUnavailable(f"CUDA error {error}")
    return values[0] if len(values) == 1 else values


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as exc:
            raise BackendUnavailable(f"TensorRT or cuda-python is not installed ({exc})") from exc
        self._cudart = cudart
        engine_info = manifest["engine_info"]
        engine_path = folder / manifest["engine"]
        props = _check(cudart.cudaGetDeviceProperties(0))
        gpu = (props.name.decode() if isinstance(props.name, bytes) else str(props.name)).strip("\x00")
        capability = f"{props.major}.{props.minor}"
        built = (engine_info.get("tensorrt_version"), engine_info.get("compute_capability"))
        if built != (trt.__version__, capability):
            raise BackendUnavailable(
                f"the engine was built with TensorRT {built[0]} for compute capability {built[1]} "
                f"({engine_info.get('gpu_name')}); this machine has TensorRT {trt.__version__} on {gpu} "
                f"(capability {capability}). Rebuild it here: python -m export --variant {manifest['variant']} "
                f"--engine required --out {folder}"
            )
        logger = trt.Logger(trt.Logger.WARNING)
        data = engine_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest.get("sha256", {}).get(manifest["engine"]):
            raise BackendUnavailable(f"{engine_path}: sha256 differs from the manifest (damaged or replaced file)")
        engine = trt.Runtime(logger).deserialize_cuda_engine(data)
        if engine is None:
            raise BackendUnavailable(f"{engine_path}: TensorRT could not deserialise the engine")
        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name, self.output_name = inputs[0], outputs[0]
        _, _, max_shape = engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch_size = int(max_shape[0])
        self.sample_shape = tuple(int(d) for d in max_shape[1:])
        sample_out = tuple(int(d) for d in manifest["outputs"][0]["shape"][1:])  # [classes] or [rows, 6]
        self.device = f"cuda:0 ({gpu})"
        self.precision = str(engine_info.get("precision", manifest["precision"]))
        self.stream = _check(cudart.cudaStreamCreate())
        in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
        self.host_in = self._pinned((self.max_batch_size, *self.sample_shape), in_dtype)
        self.host_out = self._pinned((self.max_batch_size, *sample_out), out_dtype)
        self.device_in = _check(cudart.cudaMalloc(self.host_in.nbytes))
        self.device_out = _check(cudart.cudaMalloc(self.host_out.nbytes))
        self.context.set_tensor_address(self.input_name, int(self.device_in))
        self.context.set_tensor_address(self.output_name, int(self.device_out))

    def _pinned(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        pointer = _check(self._cudart.cudaMallocHost(nbytes))
        buffer = memoryview((ctypes.c_byte * nbytes).from_address(int(pointer))).cast("B")
        array: np.ndarray = np.frombuffer(buffer, dtype=dtype).reshape(shape)
        return array

    def infer(self, batch: np.ndarray) -> np.ndarray:
        cudart, n = self._cudart, len(batch)
        if n > self.max_batch_size:
            raise ValueError(f"batch {n} exceeds the engine's profile max {self.max_batch_size}")
        self.host_in[:n] = batch
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        in_bytes = n * self.host_in[0].nbytes
        _check(cudart.cudaMemcpyAsync(self.device_in, self.host_in.ctypes.data, in_bytes, h2d, self.stream))
        if not self.context.set_input_shape(self.input_name, (n, *self.sample_shape)):
            raise RuntimeError(f"TensorRT refused input shape {(n, *self.sample_shape)}")
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        out_bytes = n * self.host_out[0].nbytes
        _check(cudart.cudaMemcpyAsync(self.host_out.ctypes.data, self.device_out, out_bytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return self.host_out[:n].astype(np.float32, copy=True)
