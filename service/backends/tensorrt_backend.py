"""TensorRT engine backend, written against the TensorRT 10/11 Python API and cuda-python.

It cannot run where there is no TensorRT or GPU (CI): nothing imports it unless the
manifest has an engine, and it is tested against fakes of `tensorrt` and
`cuda.bindings` (tests/service/test_backends.py). An engine only runs with the
TensorRT version and GPU type it was built for; a mismatch is refused with the
command that rebuilds it here (`python -m export.engine`, which the GPU image has).

Every buffer is sized from the engine itself (its tensors' shapes and its
optimisation profile) and checked against the manifest: an engine that disagrees
with its manifest is refused, never overrun. `close()` frees the device and pinned
host buffers and the stream.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from manifest import Manifest
from service.backends import BackendUnavailable


def _check(result: Any) -> Any:
    """cuda-python calls return (error, value...); raise on error, return the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise BackendUnavailable(f"CUDA error {error}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as exc:
            raise BackendUnavailable(f"TensorRT or cuda-python is not installed ({exc})") from exc
        built = manifest.engine
        if built is None:
            raise BackendUnavailable(f"{folder}: the export has no TensorRT engine")
        self._cudart = cudart
        self._device_buffers: list[int] = []
        self._host_buffers: list[int] = []
        self.stream: Any = None
        self.closed = False
        rebuild = f"python -m export.engine --model {folder}"
        props = _check(cudart.cudaGetDeviceProperties(0))
        gpu = (props.name.decode() if isinstance(props.name, bytes) else str(props.name)).strip("\x00")
        capability = f"{props.major}.{props.minor}"
        if (built.tensorrt_version, built.compute_capability) != (trt.__version__, capability):
            raise BackendUnavailable(
                f"the engine was built with TensorRT {built.tensorrt_version} for compute capability "
                f"{built.compute_capability} ({built.gpu_name}); this machine has TensorRT {trt.__version__} on {gpu} "
                f"(capability {capability}). Rebuild it here: {rebuild}"
            )
        engine_path = folder / built.path
        data = engine_path.read_bytes() if engine_path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != manifest.sha256.get(built.path):
            raise BackendUnavailable(f"{engine_path}: missing, or its sha256 differs from the manifest; {rebuild}")
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if engine is None:
            raise BackendUnavailable(f"{engine_path}: TensorRT could not deserialise the engine; {rebuild}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if (inputs, outputs) != ([manifest.input.name], [manifest.output.name]):
            raise BackendUnavailable(
                f"{engine_path}: engine tensors {inputs} -> {outputs}, the manifest says "
                f"[{manifest.input.name!r}] -> [{manifest.output.name!r}]; {rebuild}"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        low, _, high = (tuple(int(d) for d in shape) for shape in engine.get_tensor_profile_shape(self.input_name, 0))
        self.max_batch_size = high[0]
        self.sample_shape = high[1:]
        out_sample = tuple(int(d) for d in engine.get_tensor_shape(self.output_name))[1:]
        expected = (manifest.input.sample_shape, manifest.output.sample_shape, (1, manifest.batch.max))
        found = (self.sample_shape, out_sample, (low[0], self.max_batch_size))
        if found != expected or low[1:] != self.sample_shape:
            raise BackendUnavailable(
                f"{engine_path}: the engine's (input sample, output sample, batch range) are {found}, the manifest "
                f"says {expected}; {rebuild}"
            )
        in_type = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        if in_type != np.dtype(manifest.input.dtype):  # uint8 pixels into a float input would skip normalising
            raise BackendUnavailable(
                f"{engine_path}: the engine's input is {in_type}, the manifest says {manifest.input.dtype}; {rebuild}"
            )
        self.engine, self.context = engine, engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailable(f"{engine_path}: TensorRT could not create an execution context (GPU memory?)")
        self.device = f"cuda:0 ({gpu})"
        self.precision: str = built.precision
        try:
            self.stream = _check(cudart.cudaStreamCreate())
            out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
            self.host_in = self._pinned((self.max_batch_size, *self.sample_shape), in_type)
            self.host_out = self._pinned((self.max_batch_size, *out_sample), out_dtype)
            self.device_in = self._device(self.host_in.nbytes)
            self.device_out = self._device(self.host_out.nbytes)
            self.context.set_tensor_address(self.input_name, self.device_in)
            self.context.set_tensor_address(self.output_name, self.device_out)
        except BaseException as exc:  # free what was allocated, whatever failed
            self.close()
            if isinstance(exc, BackendUnavailable) or not isinstance(exc, Exception):
                raise
            raise BackendUnavailable(f"setting up the TensorRT engine failed: {type(exc).__name__}: {exc}") from exc

    def _pinned(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        pointer = int(_check(self._cudart.cudaMallocHost(nbytes)))
        self._host_buffers.append(pointer)
        buffer = memoryview((ctypes.c_byte * nbytes).from_address(pointer)).cast("B")
        array: np.ndarray = np.frombuffer(buffer, dtype=dtype).reshape(shape)
        return array

    def _device(self, nbytes: int) -> int:
        pointer = int(_check(self._cudart.cudaMalloc(nbytes)))
        self._device_buffers.append(pointer)
        return pointer

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.closed:
            raise RuntimeError("the TensorRT backend is closed")
        cudart, n = self._cudart, len(batch)
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"batch {n} is outside the engine's profile (1..{self.max_batch_size})")
        if tuple(batch.shape[1:]) != self.sample_shape:
            raise ValueError(f"input samples of shape {tuple(batch.shape[1:])}; the engine takes {self.sample_shape}")
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

    def close(self) -> None:
        """Free the device and pinned buffers and the stream (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        cudart = self._cudart
        self.context = self.engine = None  # the execution context and engine go with their last reference
        for pointer in self._device_buffers:
            cudart.cudaFree(pointer)
        for pointer in self._host_buffers:
            cudart.cudaFreeHost(pointer)
        self._device_buffers, self._host_buffers = [], []
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None
