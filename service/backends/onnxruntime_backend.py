"""onnxruntime: the CUDA provider where it is really active, otherwise the CPU.

On the CPU every session of the process allocates from one memory arena (onnxruntime's shared
environment allocator). A session's own arena keeps the peak of every batch it ever ran: a
Focal-T detector with the 640 canvas set, each canvas warmed up at batch 1, 2 and 8, held 17.5 GB
in arenas of their own after six canvases, 5.3 GB in one shared arena (measured on the 2-core CI
machine). The shared arena is never given back: memory a closed session used stays reserved for
the sessions that come after it (a replacement model reuses it).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from manifest import Manifest, sha256_file
from service.backends import BackendUnavailable

log = logging.getLogger("focal.service")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_shared_arena = threading.Lock()
_arena_registered = False


def _register_shared_cpu_arena() -> None:
    """Register the process's one CPU arena with onnxruntime's environment (once)."""
    global _arena_registered
    with _shared_arena:
        if not _arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, None)
            _arena_registered = True


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: Manifest, intra_op_threads: int = 0, spinning: bool = True) -> None:
        self.max_batch_size = manifest.batch.max
        self._folder, self._manifest, self._threads, self._spinning = folder, manifest, intra_op_threads, spinning
        if CUDA in ort.get_available_providers():
            session, self.onnx = self._open(manifest.onnx, [CUDA, CPU])
            if session.get_providers()[0] != CUDA:  # onnxruntime falls back to the CPU silently
                log.warning("the CUDA provider did not start (CUDA libraries missing?): onnxruntime runs on the CPU")
                session, self.onnx = self._open(manifest.onnx_int8 or manifest.onnx_fp32, [CPU])
        else:
            # The fp16 graph is for GPUs; on the CPU onnxruntime would run it through casts, slowly. The int8
            # graph, there only when the export was asked for it, is the CPU's choice then.
            session, self.onnx = self._open(manifest.onnx_int8 or manifest.onnx_fp32, [CPU])
        self.device = "cuda" if session.get_providers()[0] == CUDA else "cpu"
        self.precision: str = {manifest.onnx_fp32: "fp32", manifest.onnx_int8: "int8"}.get(
            self.onnx, manifest.precision
        )
        self.input_name = session.get_inputs()[0].name
        self.session: ort.InferenceSession | None = session

    def _open(self, onnx_name: str, providers: list[str]) -> tuple[ort.InferenceSession, str]:
        path = self._folder / onnx_name
        if not path.is_file():
            raise BackendUnavailable(f"{path}: missing")
        for name in [onnx_name, *([self._manifest.onnx_data] if self._manifest.onnx_data else [])]:
            expected = self._manifest.sha256.get(name)
            if expected and _sha256_once(self._folder / name) != expected:
                raise BackendUnavailable(
                    f"{self._folder / name}: sha256 differs from the manifest (damaged or replaced)"
                )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        # Spinning threads answer the next op sooner but burn a core while they wait: CPU the decode threads of
        # the host path could have used (bench.host_path measures both).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spinning else "0")
        options.log_severity_level = 3
        if providers == [CPU]:
            _register_shared_cpu_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        return ort.InferenceSession(str(path), options, providers=providers), onnx_name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise RuntimeError("the onnxruntime backend is closed")
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])

    def close(self) -> None:
        self.session = None  # its weights go with the object; working memory stays in the shared CPU arena


_hashed: dict[tuple[str, int, int, int, int], str] = {}


def _sha256_once(path: Path) -> str:
    """sha256 of a file, computed once while it is unchanged (a detector's canvases share a weights file)."""
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _hashed:
        _hashed[key] = sha256_file(path)
    return _hashed[key]
