"""Helpers the test packages share: sample images, the official golden fixtures, the export CLI,
small export folders for in-process service tests, a fake backend and a fake TensorRT runtime."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image

from manifest import (
    Anchors,
    BatchProfile,
    CanvasGraphs,
    ClassifyManifest,
    CropPreprocess,
    Detection,
    DetectionLevel,
    DetectionPostprocess,
    DetectManifest,
    Engine,
    GraphInfo,
    LetterboxPreprocess,
    Manifest,
    TensorSpec,
    Weights,
    sha256_file,
)

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_FIXTURES = Path(__file__).parent / "fixtures" / "official"
OFFICIAL_CASES = sorted(p.stem for p in OFFICIAL_FIXTURES.glob("*.json"))
OFFICIAL_V2_FIXTURES = Path(__file__).parent / "fixtures" / "official_v2"  # Focal-fast; case names start with v2_
OFFICIAL_V2_CASES = sorted(p.stem for p in OFFICIAL_V2_FIXTURES.glob("*.json"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- images ---------------------------------------------------------------------------------------
def photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """A smooth colour image with some structure (gradients + noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_rotated_jpeg(image: Image.Image) -> bytes:
    """The image stored rotated, with EXIF orientation 6 saying how to show it upright (as phones do)."""
    stored = image.transpose(Image.Transpose.ROTATE_90)  # a viewer applies ROTATE_270 for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


JPEG = encode(photo(seed=1), "JPEG", quality=90)


# -- the official golden fixtures -------------------------------------------------------------------
@dataclass(frozen=True)
class OfficialCase:
    """A golden fixture made by the official implementation (see fixtures/official/README.md)."""

    name: str
    kwargs: dict[str, Any]
    checkpoint: Path
    images: Any  # torch.Tensor
    logits: Any
    logits_b1: Any


def load_official_case(name: str) -> OfficialCase:
    import torch

    folder = OFFICIAL_V2_FIXTURES if name.startswith("v2_") else OFFICIAL_FIXTURES
    meta = json.loads((folder / f"{name}.json").read_text())
    arrays = np.load(folder / f"{name}.npz")
    return OfficialCase(
        name=name,
        kwargs=meta["official_kwargs"],
        checkpoint=folder / f"{name}.pth",
        images=torch.from_numpy(arrays["images"]),
        logits=torch.from_numpy(arrays["logits"]),
        logits_b1=torch.from_numpy(arrays["logits_b1"]),
    )


def micro_kwargs(
    name: str = "micro_224", keep: tuple[str, ...] = ("embed_dim", "depths", "num_heads")
) -> dict[str, Any]:
    """A fixture case's official keywords that shape a model (a micro Focal: fast to export and run)."""
    kwargs = load_official_case(name).kwargs
    return {k: kwargs[k] for k in keep}


CLASSIFIER_KEYS = ("embed_dim", "depths", "num_heads", "num_classes", "use_conv_embed")


# -- plain references of mmdetection's definitions (loops, not the code under test) -----------------
def reference_anchors(size: tuple[int, int], stride: int) -> np.ndarray:
    """mmdetection's AnchorGenerator, written out: cells row-major, 3 ratios x 3 octave scales per cell."""
    boxes = []
    for i in range(size[0]):
        for j in range(size[1]):
            for ratio in (0.5, 1.0, 2.0):
                for octave in range(3):
                    scale = 4 * 2 ** (octave / 3)
                    w = stride * scale / math.sqrt(ratio)
                    h = stride * scale * math.sqrt(ratio)
                    cx, cy = j * stride, i * stride
                    boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.asarray(boxes)


def reference_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, max_detections: int
) -> list[int]:
    """Per class: sort by score (ties: row order), keep a box unless a kept one overlaps it by IoU > threshold;
    then all classes together by score (ties: row order), the first max_detections."""

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    kept: list[int] = []
    for c in sorted(set(classes.tolist())):
        members = sorted((i for i in range(len(boxes)) if classes[i] == c), key=lambda i: (-scores[i], i))
        chosen: list[int] = []
        for i in members:
            if all(iou(boxes[i], boxes[j]) <= iou_threshold for j in chosen):
                chosen.append(i)
        kept.extend(chosen)
    return sorted(kept, key=lambda i: (-scores[i], i))[:max_detections]


# -- the export CLI ---------------------------------------------------------------------------------
def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m export ARGS` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


# -- export folders without exporting (for the service's in-process tests) ---------------------------
def _common(num_classes: int, size: tuple[int, int], batch: tuple[int, int, int], output: TensorSpec) -> dict[str, Any]:
    return {
        "variant": "focal_tiny",
        "official_name": "focal_tiny_patch4_window7_224",
        "input_size": size,
        "num_classes": num_classes,
        "random_init": True,
        "weights": Weights(source="random-init", sha256=None, seed=0),
        "precision": "fp32",
        "onnx": "model.fp32.onnx",
        "onnx_fp32": "model.fp32.onnx",
        "labels": "labels.txt",
        "input": TensorSpec(name="pixels", dtype="float32", shape=["batch", 3, *size]),
        "outputs": [output],
        "batch": BatchProfile(min=batch[0], opt=batch[1], max=batch[2]),
        "focal_config": {},
        "graph": GraphInfo(node_count=0, opset=20, op_counts={}),
        "verification": {},
        "engine_skipped_reason": "a test folder",
    }


def classify_manifest(
    num_classes: int = 5, size: tuple[int, int] = (32, 32), batch: tuple[int, int, int] = (1, 2, 4)
) -> ClassifyManifest:
    output = TensorSpec(name="logits", dtype="float32", shape=["batch", num_classes])
    return ClassifyManifest(
        **_common(num_classes, size, batch, output),
        weights_role="classifier",
        preprocess=CropPreprocess(
            resize_to_cover=(int(size[0] * 256 / 224), int(size[1] * 256 / 224)),
            crop=size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
    )


def detect_manifest(
    num_classes: int = 3,
    canvas: tuple[int, int] = (64, 64),
    rows: int = 20,
    more_canvases: tuple[tuple[int, int], ...] = (),
    test_scale: tuple[int, int] | None = None,
) -> DetectManifest:
    """A detector's manifest; with `more_canvases`, one that holds graphs for those canvases too."""
    output = TensorSpec(name="detections", dtype="float32", shape=["batch", rows, 6])
    common = _common(num_classes, canvas, (1, 2, 4), output)
    canvases = [
        CanvasGraphs(
            canvas=(h, w),
            onnx=f"model.{h}x{w}.fp32.onnx",
            onnx_fp32=f"model.{h}x{w}.fp32.onnx",
            input=TensorSpec(name="pixels", dtype="float32", shape=["batch", 3, h, w]),
            outputs=[output],
            graph=common["graph"],
            levels=[DetectionLevel(name="P3", stride=8, size=(h // 8, w // 8), candidates=rows)],
            verification={},
        )
        for h, w in more_canvases
    ]
    return DetectManifest(
        **common,
        canvases=canvases,
        weights_role="detector",
        preprocess=LetterboxPreprocess(canvas=canvas, mean=IMAGENET_MEAN, std=IMAGENET_STD, test_scale=test_scale),
        detection=Detection(
            output_columns=["x1", "y1", "x2", "y2", "score", "class_id"],
            coordinates="canvas pixels",
            canvas=canvas,
            levels=[DetectionLevel(name="P3", stride=8, size=(canvas[0] // 8, canvas[1] // 8), candidates=rows)],
            anchors=Anchors(
                strides=[8], octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1, 2], center_offset=0,
                per_location=9,
            ),
            box_coder={},
            selection="test",
            postprocess=DetectionPostprocess(score_threshold=0.05, nms="class-aware, greedy", iou_threshold=0.5,
                                             max_detections=5),
            neck={},
            head={},
        ),
    )  # fmt: skip


def model_folder(folder: Path, manifest: Manifest) -> Path:
    """A folder the service accepts at start-up: the manifest, labels, and placeholder graph files
    (the tests that use it give the app a fake backend, so nothing reads the graphs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / manifest.labels).write_text("\n".join(f"label_{i}" for i in range(manifest.num_classes)) + "\n")
    for name in manifest.onnx_names:
        (folder / name).write_bytes(b"placeholder, not a graph")
    manifest.write(folder)
    return folder


# -- a fake backend ----------------------------------------------------------------------------------
class FakeBackend:
    """Stands in for a model: `outputs(batch)` computes the output rows. It can be slowed
    (`delay_s`), held until released (`hold`), or made to fail (`failing`), and it records the
    batch sizes and sample shapes it saw and whether it was closed."""

    name, device, precision = "fake", "cpu", "fp32"

    def __init__(self, outputs: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 4) -> None:
        self.outputs, self.max_batch_size = outputs, max_batch_size
        self.sizes: list[int] = []
        self.shapes: set[tuple[int, ...]] = set()  # of the samples it saw
        self.delay_s = 0.0
        self.failing: str | None = None
        self.hold: threading.Event | None = None
        self.closed = False

    def infer(self, batch: np.ndarray) -> np.ndarray:
        assert not self.closed, "infer after close"
        self.sizes.append(len(batch))
        self.shapes.add(tuple(batch.shape[1:]))
        if self.hold is not None:
            self.hold.wait(10)
        time.sleep(self.delay_s)
        if self.failing:
            raise RuntimeError(self.failing)
        return self.outputs(batch)

    def close(self) -> None:
        self.closed = True


def fixed_logits(num_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Logits that rank class 0 first, then 1, 2, ..."""

    def outputs(batch: np.ndarray) -> np.ndarray:
        return np.tile(-np.arange(num_classes, dtype=np.float32), (len(batch), 1))

    return outputs


# -- the app in-process --------------------------------------------------------------------------------
async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait (polling) until `condition()` holds: tests wait for states, never for fixed times."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not come true")
        await asyncio.sleep(0.002)


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await client.get("/readyz")).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError((await client.get("/readyz")).text)
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running_app(app: FastAPI, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan around an httpx client that calls it in-process (one event loop, no server)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            if ready:
                await wait_ready(client)
            yield client


def engine_folder(tmp_path: Path, version: str = "10.16.0", capability: str = "9.0") -> tuple[Path, Manifest]:
    """A classifier's folder (5 classes, 32x32, batch 1/2/4) with an 'engine' the manifest describes."""
    manifest = classify_manifest(num_classes=5, size=(32, 32), batch=(1, 2, 4))
    folder = model_folder(tmp_path, manifest)
    (folder / "model.engine").write_bytes(b"serialised engine")
    manifest.engine = Engine(
        path="model.engine", tensorrt_version=version, gpu_name="Fake GPU H100", compute_capability=capability,
        precision="fp16", batch=BatchProfile(min=1, opt=2, max=4), onnx_sha256="0" * 64,
        built_from="model.fp16.onnx", strongly_typed=True, fp16_flag=False, tf32=False,
    )  # fmt: skip
    manifest.sha256["model.engine"] = sha256_file(folder / "model.engine")
    manifest.write(folder)
    return folder, manifest


# -- a fake TensorRT runtime ------------------------------------------------------------------------------
@dataclass
class FakeGpu:
    """What the fake `tensorrt` + `cuda.bindings.runtime` modules report and record."""

    trt_version: str = "10.16.0"
    capability: tuple[int, int] = (9, 0)
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] = ((1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32))
    output_shape: tuple[int, ...] = (-1, 5)
    tensors: tuple[str, str] = ("pixels", "logits")
    deserialises: bool = True
    creates_context: bool = True  # False: out of GPU memory for the execution context
    fail_malloc_after: int | None = None  # fail the n-th cudaMalloc (0-based)


def fake_tensorrt_runtime(gpu: FakeGpu) -> tuple[types.ModuleType, types.ModuleType, dict[str, Any]]:
    """Fake `tensorrt` and `cuda.bindings.runtime` modules that behave like the documented APIs, with
    host memory standing in for device memory. Returns (tensorrt, runtime, record)."""
    import ctypes

    record: dict[str, Any] = {"malloc": [], "free": [], "malloc_host": [], "free_host": [], "streams": [],
                              "destroyed": [], "shapes": [], "memory": {}}  # fmt: skip
    trt = types.ModuleType("tensorrt")
    trt.__version__ = gpu.trt_version  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")  # type: ignore[attr-defined]
    trt.nptype = lambda dtype: np.float32  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class Context:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}
            self.shape: tuple[int, ...] = ()

        def set_tensor_address(self, name: str, pointer: int) -> None:
            self.addresses[name] = pointer

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            record["shapes"].append(tuple(shape))
            low, _, high = gpu.profile
            self.shape = tuple(shape)
            return all(lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True))

        def execute_async_v3(self, stream: int) -> bool:
            """The 'engine': output row i = the mean of input sample i, repeated."""
            n = self.shape[0]
            sample = int(np.prod(self.shape[1:]))
            source = np.frombuffer(record["memory"][self.addresses[gpu.tensors[0]]], np.float32)[: n * sample]
            width = int(np.prod(gpu.output_shape[1:]))
            target = np.frombuffer(record["memory"][self.addresses[gpu.tensors[1]]], np.float32)
            target[: n * width] = np.repeat(source.reshape(n, sample).mean(axis=1), width)
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return gpu.tensors[i]

        def get_tensor_mode(self, name: str) -> str:
            return "input" if name == gpu.tensors[0] else "output"

        def get_tensor_dtype(self, name: str) -> str:
            return "float"

        def get_tensor_profile_shape(self, name: str, index: int) -> tuple[tuple[int, ...], ...]:
            return gpu.profile

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, *gpu.profile[0][1:]) if name == gpu.tensors[0] else gpu.output_shape

        def create_execution_context(self) -> Context | None:
            return Context() if gpu.creates_context else None

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            return Engine() if gpu.deserialises else None

    trt.Logger, trt.Runtime = Logger, Runtime  # type: ignore[attr-defined]

    runtime = types.ModuleType("cuda.bindings.runtime")
    ok = 0
    buffers: dict[int, Any] = {}

    def allocate(nbytes: int) -> int:
        buffer = (ctypes.c_byte * max(nbytes, 1))()
        pointer = ctypes.addressof(buffer)
        buffers[pointer] = buffer
        record["memory"][pointer] = memoryview(buffer).cast("B")
        return pointer

    def cuda_malloc(nbytes: int) -> tuple[int, int]:
        if gpu.fail_malloc_after is not None and len(record["malloc"]) >= gpu.fail_malloc_after:
            return 2, 0  # cudaErrorMemoryAllocation
        pointer = allocate(nbytes)
        record["malloc"].append(pointer)
        return ok, pointer

    def cuda_malloc_host(nbytes: int) -> tuple[int, int]:
        pointer = allocate(nbytes)
        record["malloc_host"].append(pointer)
        return ok, pointer

    def memcpy(dst: int, src: int, nbytes: int, kind: str, stream: int) -> tuple[int]:
        ctypes.memmove(dst, src, nbytes)
        return (ok,)

    def stream_create() -> tuple[int, int]:
        record["streams"].append(len(record["streams"]) + 1)
        return ok, record["streams"][-1]

    props = types.SimpleNamespace(name=b"Fake GPU H100\x00", major=gpu.capability[0], minor=gpu.capability[1])
    namespace = {
        "cudaGetDeviceProperties": lambda device: (ok, props),
        "cudaStreamCreate": stream_create,
        "cudaMalloc": cuda_malloc,
        "cudaMallocHost": cuda_malloc_host,
        "cudaFree": lambda p: (record["free"].append(p), (ok,))[1],
        "cudaFreeHost": lambda p: (record["free_host"].append(p), (ok,))[1],
        "cudaStreamDestroy": lambda s: (record["destroyed"].append(s), (ok,))[1],
        "cudaMemcpyAsync": memcpy,
        "cudaStreamSynchronize": lambda s: (ok,),
        "cudaMemcpyKind": types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h"),
    }
    for key, value in namespace.items():
        setattr(runtime, key, value)
    return trt, runtime, record


@contextmanager
def fake_tensorrt_installed(gpu: FakeGpu) -> Iterator[dict[str, Any]]:
    """The fake modules in sys.modules (as `import tensorrt` and `from cuda.bindings import runtime` find them)."""
    trt, runtime, record = fake_tensorrt_runtime(gpu)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    fakes = {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": runtime}
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield record
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
