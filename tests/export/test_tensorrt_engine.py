"""TensorRT engine build.

The real build runs only where TensorRT and a CUDA GPU exist (never in CI): those
tests are marked `tensorrt` and skip otherwise. The fake-module tests exist
because no real TensorRT can run here: fakes shaped like TensorRT 10.3, 10.4,
10.16 and 11.1 (flags present, removed or renumbered; timing caches that come back
None or are refused) check only that `build_engine` drives the documented APIs the
right way (which ONNX it parses, which flags it sets or clears, the profile it
adds, the timing cache's fallbacks).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from export import tensorrt_engine
from export.engine import ensure_engine, ensure_engines
from manifest import read_manifest, sha256_file
from tests.support import classify_manifest, detect_manifest, model_folder


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.log: list[str] = []


# What differs between the TensorRT releases the build must work with (from their Python bindings):
# 10.3 has no strongly typed networks; 10.4 to 10.16 have them (flag bit 1) beside the FP16 flag and
# per-layer precision; 11.x has no FP16 flag, no EXPLICIT_BATCH, no per-layer precision, and
# STRONGLY_TYPED renumbered to 0 and ignored.
RELEASES: dict[str, dict[str, Any]] = {
    "10.3.0": {"fp16_flag": True, "strongly_typed": None, "explicit_batch": True},
    "10.4.0": {"fp16_flag": True, "strongly_typed": 1, "explicit_batch": True},
    "10.16.0": {"fp16_flag": True, "strongly_typed": 1, "explicit_batch": True},
    "11.1.0": {"fp16_flag": False, "strongly_typed": 0, "explicit_batch": False},
    "12.0.0": {"fp16_flag": False, "strongly_typed": None, "explicit_batch": False},  # the ignored flag gone too
}


def _fake_tensorrt(version: str, rec: _Recorder, cache: str = "ok") -> types.ModuleType:
    """A `tensorrt` module shaped like `version`'s. `cache`: how its timing cache behaves with a previous
    file ("ok"; "corrupt": create_timing_cache gives None; "foreign": set_timing_cache says False; "raises")."""
    release = RELEASES[version]
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    weak = {"FP16": "fp16", "OBEY_PRECISION_CONSTRAINTS": "obey"} if release["fp16_flag"] else {}
    trt.BuilderFlag = types.SimpleNamespace(TF32="tf32", **weak)  # type: ignore[attr-defined]
    creation = {"EXPLICIT_BATCH": 0} if release["explicit_batch"] else {}
    if release["strongly_typed"] is not None:
        creation["STRONGLY_TYPED"] = release["strongly_typed"]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class Network:
        num_layers = 0

        def __init__(self, flags: int) -> None:
            rec.calls.append(("create_network", flags))

    class Parser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            rec.calls.append(("parse", Path(path).name))
            return True

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"cache-bytes"

    class Config:
        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            rec.calls.append(("workspace", size))

        def set_flag(self, flag: str) -> None:
            rec.calls.append(("set_flag", flag))

        def clear_flag(self, flag: str) -> None:
            rec.calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile: Any) -> int:
            rec.calls.append(("profile", profile.shapes))
            return 0

        def create_timing_cache(self, data: bytes) -> Cache | None:
            rec.calls.append(("timing_cache_in", data))
            if data and cache == "corrupt":
                return None
            if data and cache == "raises":
                raise RuntimeError("unexpected cache trouble")
            return Cache(data)

        def set_timing_cache(self, given: Cache, ignore_mismatch: bool) -> bool:
            accepted = not (given.data and cache == "foreign")
            rec.calls.append(("set_timing_cache", (given.data, accepted)))
            return accepted

        def get_timing_cache(self) -> Cache:
            return Cache(b"")

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
            rec.calls.append(("build", None))
            return b"engine-bytes"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser  # type: ignore[attr-defined]
    return trt


def _build(tmp_path: Path, fp16: bool, rec: _Recorder, cache: Path | None = None) -> dict[str, Any]:
    return tensorrt_engine.build_engine(
        fp32_onnx=tmp_path / "model.fp32.onnx",
        fp16_onnx=tmp_path / "model.fp16.onnx" if fp16 else None,
        engine_path=tmp_path / "model.engine",
        input_name="pixels",
        input_shape=(3, 224, 224),
        batch=(1, 8, 32),
        workspace_bytes=1 << 30,
        timing_cache=cache,
        log=rec.log.append,
    )


@pytest.mark.parametrize(("version", "flags"), [("10.4.0", 1 << 1), ("10.16.0", 1 << 1), ("11.1.0", 0), ("12.0.0", 0)])
@pytest.mark.parametrize("fp16", [True, False])
def test_every_engine_is_strongly_typed_from_the_verified_onnx_with_tf32_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, flags: int, fp16: bool
) -> None:
    """TensorRT 10.4+ and 11 build the same way: a strongly typed network (10.x: its flag bit; 11: no
    flag, it is the only kind) from the fp16 ONNX for an fp16 engine, no precision flag and no
    per-layer pins (TensorRT 10's FP16 flag is gone from the code), TF32 cleared."""
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(version, rec))
    details = _build(tmp_path, fp16, rec)
    source = "model.fp16.onnx" if fp16 else "model.fp32.onnx"
    assert details == {"built_from": source, "strongly_typed": True, "fp16_flag": False, "tf32": False}
    assert ("create_network", flags) in rec.calls
    assert ("parse", source) in rec.calls
    assert not [c for c in rec.calls if c[0] == "set_flag"]
    assert ("clear_flag", "tf32") in rec.calls
    assert ("profile", ("pixels", (1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))) in rec.calls
    assert (tmp_path / "model.engine").read_bytes() == b"engine-bytes"


def test_tensorrt_before_strong_typing_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.3.0", rec))
    with pytest.raises(tensorrt_engine.EngineError, match=r"TensorRT 10.3.0 has no strongly typed.*>=10.4"):
        _build(tmp_path, True, rec)
    assert not rec.calls  # nothing built
    monkeypatch.setattr(tensorrt_engine, "_first_gpu", lambda: ("NVIDIA H100", "9.0"))
    probe = tensorrt_engine.probe()
    assert not probe.available
    assert probe.reason is not None
    assert "10.4" in probe.reason


def test_timing_cache_new_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.16.0", rec))
    cache = tmp_path / "timing.cache"
    _build(tmp_path, True, rec, cache)
    assert cache.read_bytes() == b"cache-bytes"
    _build(tmp_path, True, rec, cache)
    assert ("set_timing_cache", (b"cache-bytes", True)) in rec.calls  # reused on the next build
    assert rec.log == [f"timing cache {cache} (new)", f"timing cache {cache} (reused)"]


@pytest.mark.parametrize(
    ("behaviour", "warning"),
    [
        ("corrupt", "is unreadable (damaged, or another TensorRT version): building with an empty cache"),
        ("foreign", "is from another GPU type: building with an empty cache"),
        ("raises", "not used (RuntimeError: unexpected cache trouble)"),
    ],
)
def test_a_bad_timing_cache_never_fails_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str, warning: str
) -> None:
    """create_timing_cache giving None, set_timing_cache saying False, or anything raising: the build goes
    on (with an empty cache where TensorRT takes one), warns, and leaves the file as it was."""
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.1.0", rec, cache=behaviour))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"someone else's cache")
    details = _build(tmp_path, True, rec, cache)
    assert details["strongly_typed"]
    assert ("build", None) in rec.calls
    assert cache.read_bytes() == b"someone else's cache"
    assert any(warning in line and line.startswith("warning:") for line in rec.log), rec.log
    if behaviour != "raises":
        assert ("set_timing_cache", (b"", True)) in rec.calls  # an empty cache instead


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
        return {"built_from": kwargs["fp32_onnx"].name, "strongly_typed": True, "fp16_flag": False, "tf32": False}

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
    assert again.engine is not None
    old = {"strongly_typed": False, "fp16_flag": True, "tf32": True}  # an engine from before strong typing
    again.engine = again.engine.model_copy(update=old)
    ensure_engine(folder, again, "auto", log=lambda _: None)
    assert len(builds) == 3  # rebuilt: it did not compute what the export verified
    assert again.engine is not None
    assert (again.engine.strongly_typed, again.engine.fp16_flag, again.engine.tf32) == (True, False, False)
    ensure_engine(folder, again, "skip", log=lambda _: None)
    assert again.engine is None
    assert again.engine_skipped_reason == "--engine skip"
    assert not (folder / "model.engine").exists()
    assert "model.engine" not in again.sha256


def test_each_canvas_gets_its_engine_rebuilt_when_the_shared_weights_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ensure_engines` on a detector with two canvases (stand-in build, as above): one engine per
    canvas, named after it, each in its canvas's manifest entry; reused while nothing changed, and
    rebuilt when only `weights.data` changed (the graphs name their weights by offset, so their own
    bytes stay the same)."""
    manifest = detect_manifest(canvas=(64, 96), more_canvases=((96, 64),))
    manifest.onnx_data = "weights.data"
    folder = model_folder(tmp_path, manifest)
    (folder / "weights.data").write_bytes(b"weights v1")
    manifest.sha256 = {name: sha256_file(folder / name) for name in manifest.onnx_names}
    builds: list[dict[str, Any]] = []

    def build(**kwargs: Any) -> dict[str, Any]:
        builds.append(kwargs)
        kwargs["engine_path"].write_bytes(b"engine")
        return {"built_from": kwargs["fp32_onnx"].name, "strongly_typed": True, "fp16_flag": False, "tf32": False}

    probe = tensorrt_engine.TensorRTProbe(True, None, "10.16.0", "NVIDIA H100", "9.0")
    monkeypatch.setattr(tensorrt_engine, "probe", lambda: probe)
    monkeypatch.setattr(tensorrt_engine, "build_engine", build)
    ensure_engines(folder, manifest, "auto", log=lambda _: None)
    assert [(b["fp32_onnx"].name, b["engine_path"].name, b["input_shape"]) for b in builds] == [
        ("model.fp32.onnx", "model.engine", (3, 64, 96)),
        ("model.96x64.fp32.onnx", "model.96x64.engine", (3, 96, 64)),
    ]
    views = manifest.canvas_views()
    assert [v.engine.path for v in views if v.engine] == ["model.engine", "model.96x64.engine"]
    assert {"model.engine", "model.96x64.engine"} <= set(manifest.sha256)
    ensure_engines(folder, manifest, "auto", log=lambda _: None)
    assert len(builds) == 2  # reused
    (folder / "weights.data").write_bytes(b"weights v2")
    manifest.sha256["weights.data"] = sha256_file(folder / "weights.data")
    ensure_engines(folder, manifest, "auto", log=lambda _: None)
    assert len(builds) == 4
