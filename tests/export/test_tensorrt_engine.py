"""TensorRT engine build.

The real build runs only where TensorRT and a CUDA GPU exist (never in CI): those
tests are marked `tensorrt` and skip otherwise. The fake-module tests exist
because no real TensorRT can run here: they check only that `build_engine`
drives the documented TensorRT 10 and 11 APIs the right way (which ONNX it
parses, which flags it sets, the profile it adds, the timing cache round trip).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from export import tensorrt_engine
from export.engine import ensure_engine
from manifest import read_manifest, sha256_file
from tests.support import classify_manifest, model_folder


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.layers: list[Any] = []


def _fake_tensorrt(version: str, has_fp16_flag: bool, rec: _Recorder, detector: bool = False) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    flags = {"OBEY_PRECISION_CONSTRAINTS": "obey"} | ({"FP16": "fp16"} if has_fp16_flag else {})
    trt.BuilderFlag = types.SimpleNamespace(**flags)  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")  # type: ignore[attr-defined]
    trt.LayerType = types.SimpleNamespace(  # type: ignore[attr-defined]
        NORMALIZATION="norm",
        SOFTMAX="softmax",
        MATRIX_MULTIPLY="mm",
        TOPK="topk",
        ELEMENTWISE="elementwise",
        CONSTANT="constant",
        CAST="cast",
    )
    trt.float32, trt.float16, trt.int64 = "float32", "float16", "int64"  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class Tensor:
        def __init__(self, name: str, dtype: str = "float32") -> None:
            self.name, self.dtype = name, dtype

    class Layer:
        def __init__(self, kind: str, inputs: list[str], outputs: list[Tensor], name: str | None = None) -> None:
            self.type, self.name, self.precision = kind, name or kind, None
            self.inputs, self.outputs = [Tensor(n) for n in inputs], outputs
            self.num_inputs, self.num_outputs = len(self.inputs), len(outputs)
            rec.layers.append(self)

        def get_input(self, index: int) -> Tensor:
            return self.inputs[index]

        def get_output(self, index: int) -> Tensor:
            return self.outputs[index]

        def set_output_type(self, index: int, dtype: str) -> None:
            rec.calls.append(("output_type", (self.name, dtype)))

    class Network:
        def __init__(self, flags: int) -> None:
            rec.calls.append(("create_network", flags))
            self.layers = [
                Layer("mm", ["pixels"], [Tensor("a")]),
                Layer("norm", ["a"], [Tensor("b")]),
                Layer("softmax", ["b"], [Tensor("c")]),
            ]
            if detector:  # the tail of a detection graph: TopK, index arithmetic, box decoding
                self.layers += [
                    Layer("constant", [], [Tensor("anchors")], name="anchors"),
                    Layer("constant", [], [Tensor("other")], name="other_constant"),
                    Layer("elementwise", ["c", "other"], [Tensor("unrelated")], name="before_topk"),
                    Layer("topk", ["c"], [Tensor("scores"), Tensor("index", "int64")]),
                    Layer("elementwise", ["index"], [Tensor("anchor", "int64")], name="anchor_div"),
                    Layer("cast", ["anchor"], [Tensor("class_id")], name="class_to_float"),
                    Layer("elementwise", ["scores", "anchors"], [Tensor("boxes")], name="decode"),
                ]
            self.num_layers = len(self.layers)

        def get_layer(self, i: int) -> Layer:
            return self.layers[i]

    class Parser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            rec.calls.append(("parse", Path(path).name))
            return True

    class Cache:
        def serialize(self) -> bytes:
            return b"cache-bytes"

    class Config:
        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            rec.calls.append(("workspace", size))

        def set_flag(self, flag: str) -> None:
            rec.calls.append(("flag", flag))

        def add_optimization_profile(self, profile: Any) -> int:
            rec.calls.append(("profile", profile.shapes))
            return 0

        def create_timing_cache(self, data: bytes) -> Cache:
            rec.calls.append(("timing_cache_in", data))
            return Cache()

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            return True

        def get_timing_cache(self) -> Cache:
            return Cache()

    class Profile:
        def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
            self.shapes = (name, lo, opt, hi)

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            return b"engine-bytes"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser  # type: ignore[attr-defined]
    return trt


def _build(tmp_path: Path, fp16: bool, cache: Path | None = None) -> dict[str, Any]:
    return tensorrt_engine.build_engine(
        fp32_onnx=tmp_path / "model.fp32.onnx",
        fp16_onnx=tmp_path / "model.fp16.onnx" if fp16 else None,
        engine_path=tmp_path / "model.engine",
        input_name="pixels",
        input_shape=(3, 224, 224),
        batch=(1, 8, 32),
        workspace_bytes=1 << 30,
        timing_cache=cache,
        log=lambda _: None,
    )


def test_tensorrt10_fp16_uses_the_flag_on_the_fp32_onnx_and_pins_norm_and_softmax(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.16.0", has_fp16_flag=True, rec=rec))
    details = _build(tmp_path, fp16=True)
    assert details == {"built_from": "model.fp32.onnx", "strongly_typed": False, "fp16_flag": True}
    assert ("create_network", 0) in rec.calls
    assert ("flag", "fp16") in rec.calls
    assert ("flag", "obey") in rec.calls  # without it TensorRT 10 treats the fp32 pins as hints only
    assert {layer.name: layer.precision for layer in rec.layers} == {
        "mm": None,
        "norm": "float32",
        "softmax": "float32",
    }
    assert ("output_type", ("norm", "float32")) in rec.calls
    assert ("output_type", ("softmax", "float32")) in rec.calls
    assert ("profile", ("pixels", (1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))) in rec.calls
    assert (tmp_path / "model.engine").read_bytes() == b"engine-bytes"


def test_tensorrt11_fp16_builds_strongly_typed_from_the_fp16_onnx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.1.0", has_fp16_flag=False, rec=rec))
    cache = tmp_path / "timing.cache"
    details = _build(tmp_path, fp16=True, cache=cache)
    assert details == {"built_from": "model.fp16.onnx", "strongly_typed": True, "fp16_flag": False}
    assert ("create_network", 1 << 5) in rec.calls
    assert not [c for c in rec.calls if c[0] == "flag"]
    assert ("timing_cache_in", b"") in rec.calls
    assert cache.read_bytes() == b"cache-bytes"
    _build(tmp_path, fp16=True, cache=cache)
    assert ("timing_cache_in", b"cache-bytes") in rec.calls  # reused on the next build


def test_probe_without_tensorrt_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    result = tensorrt_engine.probe()
    assert not result.available
    assert result.reason == "TensorRT is not installed (Python package 'tensorrt')"


@pytest.mark.tensorrt
def test_real_engine_build(tmp_path: Path) -> None:
    """Builds a real engine from a real export; runs only with TensorRT and a CUDA GPU."""
    pytest.importorskip("tensorrt")
    if not tensorrt_engine.probe().available:
        pytest.skip(tensorrt_engine.probe().reason or "no TensorRT")
    from export.options import ExportOptions
    from export.pipeline import run_export

    manifest = run_export(
        ExportOptions(variant="focal_tiny", random_init=True, fp16=True, out=tmp_path, engine="required"),
        log=lambda _: None,
    )
    assert manifest.engine is not None
    assert manifest.engine.path == "model.engine"
    assert (tmp_path / manifest.engine.path).stat().st_size > 0
    assert read_manifest(tmp_path).engine == manifest.engine


def test_tensorrt10_fp16_keeps_a_detectors_box_decoding_in_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TopK, every floating-point layer it feeds and the constants those read are pinned
    to fp32; integer index layers, casts and everything before the TopK are left alone."""
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.16.0", True, rec, detector=True))
    _build(tmp_path, fp16=True)
    precision = {layer.name: layer.precision for layer in rec.layers}
    assert precision["decode"] == precision["topk"] == precision["anchors"] == "float32"
    assert ("output_type", ("decode", "float32")) in rec.calls
    assert ("output_type", ("topk", "float32")) in rec.calls  # its values; not its int64 indices
    assert len([c for c in rec.calls if c == ("output_type", ("topk", "float32"))]) == 1
    for name in ("anchor_div", "class_to_float", "before_topk", "other_constant", "mm"):
        assert precision[name] is None, name


def test_the_engine_step_records_the_engine_reuses_it_and_rebuilds_a_damaged_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ensure_engine` with a probe that finds a GPU and a stand-in for the build (no TensorRT here): the
    manifest's `engine` holds the path and the build facts, and survives a write and a read."""
    manifest = classify_manifest()
    folder = model_folder(tmp_path, manifest)
    builds: list[dict[str, Any]] = []

    def build(**kwargs: Any) -> dict[str, Any]:
        builds.append(kwargs)
        kwargs["engine_path"].write_bytes(b"engine %d" % len(builds))
        return {"built_from": kwargs["fp32_onnx"].name, "strongly_typed": False, "fp16_flag": False}

    probe = tensorrt_engine.TensorRTProbe(True, None, "10.16.0", "NVIDIA H100", "9.0")
    monkeypatch.setattr(tensorrt_engine, "probe", lambda: probe)
    monkeypatch.setattr(tensorrt_engine, "build_engine", build)
    ensure_engine(folder, manifest, "auto", log=lambda _: None)
    assert manifest.engine is not None
    assert (manifest.engine.path, manifest.engine.gpu_name, manifest.engine.tensorrt_version) == (
        "model.engine",
        "NVIDIA H100",
        "10.16.0",
    )
    assert manifest.sha256["model.engine"] == sha256_file(folder / "model.engine")
    assert builds[0]["batch"] == (1, 2, 4)
    assert builds[0]["input_shape"] == (3, 32, 32)
    manifest.write(folder)
    again = read_manifest(folder)
    assert again.engine == manifest.engine
    ensure_engine(folder, again, "auto", log=lambda _: None)
    assert len(builds) == 1  # same GPU, TensorRT, ONNX, precision and profile: reused
    (folder / "model.engine").write_bytes(b"damaged")
    ensure_engine(folder, again, "auto", log=lambda _: None)
    assert len(builds) == 2
    ensure_engine(folder, again, "skip", log=lambda _: None)
    assert again.engine is None
    assert again.engine_skipped_reason == "--engine skip"
    assert not (folder / "model.engine").exists()
    assert "model.engine" not in again.sha256
