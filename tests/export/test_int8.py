"""`--int8`: the dynamically quantized CPU graph, its verification against fp32, and the CPU service
choosing it only when the export was asked for it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch

from export.engine import copy_export
from export.options import ExportError, ExportOptions
from export.pipeline import INT8_ONNX, run_export
from export.verify import INT8_MIN_TOP1_AGREEMENT, INT8_RELATIVE_TOLERANCE, VerificationError
from focal.checkpoint import read_state_dict
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
    assert report["top1_kept"] >= INT8_MIN_TOP1_AGREEMENT  # what is gated (near-ties count as kept)
    assert report["top1_agreement"] <= report["top1_kept"]
    assert report["limits"] == {"relative_diff": 0.1, "top1_kept": 0.9, "near_tie": 0.01}
    assert "dynamic quantization" in report["method"]
    assert "int8 dot products" in report["checked_with"]
    assert "[5/8] int8 ONNX + verification" in log
    assert "[6/8] uint8 input + verification" in log
    assert manifest.verification["uint8_input_vs_float"]["graphs"][INT8_ONNX]["relative_diff"] < 1e-2
    assert "int8 vs fp32 (onnxruntime): max |diff|" in log
    assert "top-1 kept" in log
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


def test_activation_outliers_that_int8_cannot_represent_are_refused(tmp_path: Path) -> None:
    """A realistic failure: one LayerNorm channel 300x larger than the rest (the next Linear's weights scaled
    down to match, so the fp32 model computes the same). Dynamic quantization takes one range per
    activation tensor, so the other channels lose their resolution, and the export must refuse."""
    case = load_official_case("micro_224")
    state = read_state_dict(case.checkpoint)
    k = 300.0
    for key in list(state):
        for norm, linear in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
            if key.endswith(f".{norm}.weight"):
                block = key.removesuffix(f"{norm}.weight")
                for part in ("weight", "bias"):
                    state[f"{block}{norm}.{part}"] = state[f"{block}{norm}.{part}"].clone()
                    state[f"{block}{norm}.{part}"][0] *= k
                state[f"{block}{linear}.weight"] = state[f"{block}{linear}.weight"].clone()
                state[f"{block}{linear}.weight"][:, 0] /= k
    weights = tmp_path / "outlier.pth"
    torch.save({"model": state}, weights)
    opts = ExportOptions(
        variant="focal_tiny",
        weights=weights,
        int8=True,
        model_kwargs=micro_kwargs("micro_224", CLASSIFIER_KEYS),
        out=tmp_path / "export",
        engine="skip",
    )
    with pytest.raises(VerificationError, match="the int8 graph disagrees with fp32"):
        run_export(opts, log=lambda _: None)  # the fp32 graph verified (the same function); int8 did not
    assert not (tmp_path / "export" / "manifest.json").exists()


def test_exports_with_and_without_int8_stay_apart(
    int8_export: tuple[Path, ClassifyManifest, str], tmp_path: Path
) -> None:
    """Re-exported without --int8, the folder loses the int8 graph; `export.engine` copying one over the other
    copies (same weights and fp32 graph, but another export); a manifest without int8 leaves the field out."""
    folder, manifest, _ = int8_export
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    opts = ExportOptions(
        variant="focal_tiny",
        weights=load_official_case("micro_224").checkpoint,
        model_kwargs=micro_kwargs("micro_224", CLASSIFIER_KEYS),
        out=plain,
        engine="skip",
    )
    assert dataclasses.replace(opts, int8=True).default_out().name == f"{opts.default_out().name}-int8"
    run_export(opts, log=lambda _: None)
    assert not (plain / INT8_ONNX).exists()
    assert "onnx_int8" not in json.loads((plain / "manifest.json").read_text())  # readable by older readers
    assert read_manifest(plain).sha256[manifest.onnx_fp32] == manifest.sha256[manifest.onnx_fp32]

    target = tmp_path / "cache"
    copy_export(folder, target, log=lambda _: None)
    assert read_manifest(target).onnx_int8 == INT8_ONNX
    copy_export(plain, target, log=lambda _: None)
    assert read_manifest(target).onnx_int8 is None


def test_where_cuda_does_not_start_the_cpu_fallback_prefers_int8(
    int8_export: tuple[Path, ClassifyManifest, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime lists CUDA but the session runs on the CPU (its libraries missing): the int8 graph then."""
    folder, manifest, _ = int8_export
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime warns that the CUDA provider is not available
        backend = OnnxRuntimeBackend(folder, manifest)
    assert (backend.onnx, backend.precision, backend.device) == (INT8_ONNX, "int8", "cpu")


def test_int8_is_refused_for_detection(tmp_path: Path) -> None:
    opts = ExportOptions(variant="focal_tiny", task="detect", random_init=True, int8=True, out=tmp_path)
    with pytest.raises(ExportError, match="--int8 is not offered for --task detect"):
        opts.validate()
