"""`--int8`: the dynamically quantized CPU graph, its verification against fp32, and the CPU service
choosing it only when the export was asked for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from export.int8 import quantize_int8
from export.options import ExportError, ExportOptions
from export.pipeline import INT8_ONNX, run_export
from export.tasks.classify import ClassifyTask
from export.verify import INT8_MIN_TOP1_AGREEMENT, INT8_RELATIVE_TOLERANCE, VerificationError
from manifest import ClassifyManifest, read_manifest, sha256_file
from service.app import create_app
from service.backends.onnxruntime_backend import OnnxRuntimeBackend
from service.settings import Settings
from tests.conftest import ClassifyExport
from tests.support import CLASSIFIER_KEYS, encode, load_official_case, micro_kwargs, photo, running_app

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ClassifyManifest, str]:
    """A micro Focal-T from the official fixture's weights, exported with --int8."""
    folder = tmp_path_factory.mktemp("int8")
    case = load_official_case("micro_224")
    lines: list[str] = []
    opts = ExportOptions(
        variant="focal_tiny",
        weights=case.checkpoint,
        int8=True,
        model_kwargs=micro_kwargs("micro_224", CLASSIFIER_KEYS),
        out=folder,
        engine="skip",
    )
    manifest = run_export(opts, log=lines.append)
    assert isinstance(manifest, ClassifyManifest)
    return folder, manifest, "\n".join(lines)


def test_the_int8_graph_is_verified_and_recorded(int8_export: tuple[Path, ClassifyManifest, str]) -> None:
    folder, manifest, log = int8_export
    assert manifest.onnx_int8 == INT8_ONNX
    assert manifest.sha256[INT8_ONNX] == sha256_file(folder / INT8_ONNX)
    report: dict[str, Any] = manifest.verification["int8_vs_fp32"]
    assert report["samples"] == 32
    assert report["relative_diff"] <= INT8_RELATIVE_TOLERANCE
    assert report["top1_agreement"] >= INT8_MIN_TOP1_AGREEMENT
    assert "dynamic quantization" in report["method"]
    assert "[5/7] int8 ONNX + verification" in log
    assert "int8 vs fp32 (onnxruntime): max |diff|" in log
    ops = {node.op_type for node in onnx.load(str(folder / INT8_ONNX)).graph.node}
    assert "MatMulInteger" in ops  # the linear layers run on int8 weights
    assert read_manifest(folder).onnx_int8 == INT8_ONNX


async def test_the_cpu_service_serves_int8_only_when_asked(
    int8_export: tuple[Path, ClassifyManifest, str], classify_export: ClassifyExport
) -> None:
    folder, manifest, _ = int8_export
    backend = OnnxRuntimeBackend(folder, manifest)
    assert (backend.onnx, backend.precision, backend.device) == (INT8_ONNX, "int8", "cpu")
    assert OnnxRuntimeBackend(classify_export.folder, classify_export.manifest).precision == "fp32"  # not asked

    image = photo((300, 220))
    async with running_app(create_app(Settings(models=[folder]))) as client:
        files = {"image": ("photo.png", encode(image, "PNG"), "image/png")}
        response = await client.post("/classify?top_k=3", files=files)
        models = (await client.get("/v1/models")).json()["models"]
    assert response.status_code == 200, response.text
    assert models[0]["precision"] == "int8"
    assert len(response.json()["results"][0]["predictions"]) == 3


def test_an_int8_graph_that_disagrees_with_fp32_is_refused(
    int8_export: tuple[Path, ClassifyManifest, str], tmp_path: Path
) -> None:
    """The verification can fail: the int8 graph of other weights (the fixture's weights shuffled) is refused."""
    folder, manifest, _ = int8_export
    graph = onnx.load(str(folder / manifest.onnx_fp32))
    rng = np.random.default_rng(0)
    for init in graph.graph.initializer:
        if init.name.endswith("weight") or len(init.dims) == 2:
            values = onnx.numpy_helper.to_array(init).copy()
            rng.shuffle(values.reshape(-1))
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    other = tmp_path / "other.fp32.onnx"
    onnx.save(graph, str(other))
    quantize_int8(other, tmp_path / "other.int8.onnx")
    with pytest.raises(VerificationError, match="the int8 graph disagrees with fp32"):
        ClassifyTask().verify_int8(folder / manifest.onnx_fp32, tmp_path / "other.int8.onnx", (224, 224))


def test_int8_is_refused_for_detection(tmp_path: Path) -> None:
    opts = ExportOptions(variant="focal_tiny", task="detect", random_init=True, int8=True, out=tmp_path)
    with pytest.raises(ExportError, match="--int8 is not offered for --task detect"):
        opts.validate()
