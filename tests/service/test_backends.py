"""Backends: onnxruntime against the PyTorch reference on real exports, and the TensorRT backend against
fakes of `tensorrt` and `cuda.bindings` (no real TensorRT or GPU can run here: the fakes behave as the
documented TensorRT 10/11 runtime API does, with host memory standing in for device memory)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.tasks.detect import compare_selections
from manifest import Engine
from service.backends import BackendUnavailable, load_backend
from service.backends.onnxruntime_backend import OnnxRuntimeBackend
from service.backends.tensorrt_backend import TensorRTBackend
from service.backends.torch_backend import TorchBackend
from tests.conftest import DETECT_CANVAS, ClassifyExport, DetectExport
from tests.support import FakeGpu, engine_folder, fake_tensorrt_installed


def test_onnxruntime_classifier_matches_pytorch_and_closes(classify_export: ClassifyExport) -> None:
    ort_backend = OnnxRuntimeBackend(classify_export.folder, classify_export.manifest)
    torch_backend = TorchBackend(classify_export.manifest)  # rebuilt: random-init, the export's seed
    # uint8 pixels: the graph normalises them, and so does the torch backend for such an export
    assert classify_export.manifest.input.dtype == "uint8"
    images = np.random.default_rng(7).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    np.testing.assert_allclose(ort_backend.infer(images), torch_backend.infer(images), atol=1e-5)
    for i in range(3):  # batch elements are independent
        np.testing.assert_allclose(ort_backend.infer(images[i : i + 1])[0], ort_backend.infer(images)[i], atol=1e-5)
    ort_backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        ort_backend.infer(images)


def test_onnxruntime_detector_matches_pytorch_at_batch_1_and_3(detect_export: DetectExport) -> None:
    manifest = detect_export.manifest
    ort_backend, torch_backend = OnnxRuntimeBackend(detect_export.folder, manifest), TorchBackend(manifest)
    generator = torch.Generator().manual_seed(7)
    inputs = {b: torch.randn(b, 3, *DETECT_CANVAS, generator=generator).numpy() for b in (1, 3)}
    ours = {b: torch_backend.infer(x) for b, x in inputs.items()}
    theirs = {b: ort_backend.infer(x) for b, x in inputs.items()}
    assert theirs[3].shape == (3, *manifest.output.sample_shape)
    rows = [level.candidates for level in manifest.detection.levels]
    score_diff, agreement = compare_selections(ours, theirs, rows, box_tolerance=1e-3)
    assert score_diff < 1e-5
    assert agreement >= 0.99
    # Each level's rows come sorted by score, and the class ids are whole numbers in range.
    for start, stop in zip(np.cumsum([0, *rows[:-1]]), np.cumsum(rows), strict=True):
        assert np.diff(theirs[3][:, start:stop, 4], axis=1).max() <= 1e-6
    classes = theirs[3][..., 5]
    assert np.array_equal(classes, np.round(classes))
    assert 0 <= classes.min() <= classes.max() < manifest.num_classes


def test_a_damaged_graph_or_a_missing_engine_is_refused(classify_export: ClassifyExport, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(classify_export.folder, folder)
    graph = folder / classify_export.manifest.onnx_fp32
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BackendUnavailable, match="sha256 differs from the manifest"):
        OnnxRuntimeBackend(folder, classify_export.manifest)
    with pytest.raises(BackendUnavailable, match="the export has no TensorRT engine"):
        load_backend(folder, classify_export.manifest, "tensorrt")


# -- TensorRT, against fakes ---------------------------------------------------------------------------------
def test_tensorrt_binds_buffers_from_the_engine_runs_batches_and_frees_everything(tmp_path: Path) -> None:
    folder, manifest = engine_folder(tmp_path)
    with fake_tensorrt_installed(FakeGpu()) as record:
        backend = load_backend(folder, manifest, "auto")
        assert isinstance(backend, TensorRTBackend)
        assert (backend.max_batch_size, backend.sample_shape) == (4, (3, 32, 32))
        assert (backend.host_in.shape, backend.host_out.shape) == ((4, 3, 32, 32), (4, 5))
        assert (backend.device, backend.precision) == ("cuda:0 (Fake GPU H100)", "fp16")
        batch = np.stack([np.full((3, 32, 32), v, np.float32) for v in (1.0, 2.0, 3.0)])
        out = backend.infer(batch)
        np.testing.assert_allclose(out, np.repeat([[1.0], [2.0], [3.0]], 5, axis=1))
        assert record["shapes"] == [(3, 3, 32, 32)]  # the input shape is set per batch
        with pytest.raises(ValueError, match=r"outside the engine's profile \(1..4\)"):
            backend.infer(np.zeros((5, 3, 32, 32), np.float32))
        with pytest.raises(ValueError, match="samples of shape"):
            backend.infer(np.zeros((1, 3, 16, 16), np.float32))
        backend.close()
        backend.close()  # twice is harmless
        assert sorted(record["free"]) == sorted(record["malloc"])
        assert len(record["free"]) == 2
        assert sorted(record["free_host"]) == sorted(record["malloc_host"])
        assert len(record["free_host"]) == 2
        assert record["destroyed"] == record["streams"] == [1]
        with pytest.raises(RuntimeError, match="closed"):
            backend.infer(batch)


@pytest.mark.parametrize(
    ("gpu", "message"),
    [
        (FakeGpu(output_shape=(-1, 7)), r"the engine's \(input sample, output sample, batch range\) are"),
        (FakeGpu(profile=((1, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32))), r"batch range"),
        (FakeGpu(profile=((2, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32))), r"batch range"),
        (FakeGpu(profile=((1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))), r"input sample"),
        (FakeGpu(tensors=("input", "logits")), r"engine tensors \['input'\] -> \['logits'\]"),
        (FakeGpu(deserialises=False), "could not deserialise"),
        (FakeGpu(trt_version="10.8.0"), "built with TensorRT 10.16.0 for compute capability 9.0"),
        (FakeGpu(capability=(8, 9)), "this machine has TensorRT 10.16.0 on Fake GPU H100 .capability 8.9."),
    ],
)
def test_tensorrt_refuses_an_engine_that_disagrees_with_its_manifest_or_this_machine(
    gpu: FakeGpu, message: str, tmp_path: Path
) -> None:
    folder, manifest = engine_folder(tmp_path)
    with fake_tensorrt_installed(gpu) as record, pytest.raises(BackendUnavailable, match=message) as refused:
        TensorRTBackend(folder, manifest)
    assert f"python -m export.engine --model {folder}" in str(refused.value)  # the rebuild command, torch-free
    assert not record["malloc"]  # refused before allocating anything


def test_tensorrt_refuses_an_engine_whose_input_type_is_not_the_manifests(tmp_path: Path) -> None:
    """A float-input engine beside a manifest that says uint8 (the graph normalises): the raw pixels
    would reach the model unnormalised, so the engine is refused with the rebuild command. (The fake
    engine's input is float32.)"""
    folder, manifest = engine_folder(tmp_path)
    manifest.input.dtype, manifest.preprocess.normalise = "uint8", "graph"
    with (
        fake_tensorrt_installed(FakeGpu()) as record,
        pytest.raises(BackendUnavailable, match="the engine's input is float32, the manifest says uint8") as refused,
    ):
        TensorRTBackend(folder, manifest)
    assert f"python -m export.engine --model {folder}" in str(refused.value)
    assert not record["malloc"]


def test_tensorrt_without_memory_for_an_execution_context_is_unavailable(tmp_path: Path) -> None:
    folder, manifest = engine_folder(tmp_path)
    with (
        fake_tensorrt_installed(FakeGpu(creates_context=False)) as record,
        pytest.raises(BackendUnavailable, match=r"could not create an execution context \(GPU memory\?\)"),
    ):
        TensorRTBackend(folder, manifest)
    assert not record["malloc"]


def test_tensorrt_frees_what_it_allocated_when_an_allocation_fails(tmp_path: Path) -> None:
    folder, manifest = engine_folder(tmp_path)
    with fake_tensorrt_installed(FakeGpu(fail_malloc_after=1)) as record:
        with pytest.raises(BackendUnavailable, match="CUDA error 2"):
            TensorRTBackend(folder, manifest)
        assert len(record["malloc"]) == 1
        assert record["free"] == record["malloc"]
        assert sorted(record["free_host"]) == sorted(record["malloc_host"])
        assert record["destroyed"] == [1]


def test_auto_falls_back_to_onnxruntime_when_the_engine_cannot_run(
    classify_export: ClassifyExport, tmp_path: Path
) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(classify_export.folder, folder)
    manifest = classify_export.manifest.model_copy(deep=True)
    (folder / "model.engine").write_bytes(b"engine")
    manifest.engine = Engine(
        path="model.engine", tensorrt_version="10.16.0", gpu_name="Fake GPU H100", compute_capability="9.0",
        precision="fp16", batch=manifest.batch, onnx_sha256="0" * 64, built_from="model.fp16.onnx",
        strongly_typed=True, fp16_flag=False,
    )  # fmt: skip
    manifest.sha256["model.engine"] = "not the engine's"
    with fake_tensorrt_installed(FakeGpu(profile=((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)))):
        assert load_backend(folder, manifest, "auto").name == "onnxruntime"
        with pytest.raises(BackendUnavailable, match="sha256 differs from the manifest"):
            load_backend(folder, manifest, "tensorrt")


@pytest.mark.parametrize(("env", "allowed"), [(None, "1"), ("false", "0")])
def test_onnxruntime_spinning_follows_the_setting(
    classify_export: ClassifyExport, monkeypatch: pytest.MonkeyPatch, env: str | None, allowed: str
) -> None:
    """FOCAL_INTRA_OP_SPINNING reaches the session: spinning threads burn CPU the decode threads could use."""
    import onnxruntime as ort

    from service.models import check_model_folder, default_backend
    from service.settings import Settings

    seen: list[str] = []
    real = ort.InferenceSession

    def recording(path: str, options: ort.SessionOptions, **kwargs: object) -> ort.InferenceSession:
        seen.append(options.get_session_config_entry("session.intra_op.allow_spinning"))
        return real(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    if env is not None:
        monkeypatch.setenv("FOCAL_INTRA_OP_SPINNING", env)
    backend = default_backend(check_model_folder(classify_export.folder), Settings(models=[classify_export.folder]))
    assert seen == [allowed]
    backend.close()
