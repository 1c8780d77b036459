"""Focal-fast through the export CLI: every official v2 fixture exported from its checkpoint gives the
official logits on onnxruntime at batch 1 and 3, the coordinate MLPs are folded away, and the export
is served."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import onnx_export
from export.options import ExportError, ExportOptions
from export.pipeline import run_export
from manifest import read_manifest, sha256_file
from service.app import create_app
from service.settings import Settings
from tests.support import (
    CLASSIFIER_KEYS,
    JPEG,
    OFFICIAL_V2_CASES,
    load_official_case,
    micro_kwargs,
    run_cli,
    running_app,
)

RELATIVE_TOLERANCE = 1e-5  # of the largest logit, as for the PyTorch model


def _run(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"pixels": images})[0])


@pytest.mark.parametrize("name", OFFICIAL_V2_CASES)
def test_the_cli_export_of_a_v2_checkpoint_gives_the_official_logits(name: str, tmp_path: Path) -> None:
    case = load_official_case(name)
    height, width = (
        case.kwargs["img_size"] if isinstance(case.kwargs["img_size"], list) else [case.kwargs["img_size"]] * 2
    )
    fp16 = name == "v2_micro_224"  # one case also through the fp16 conversion and its verification
    result = run_cli(
        "--variant", "focal_fast_tiny", "--weights", str(case.checkpoint), "--image-size", f"{height}x{width}",
        "--model-kwargs", json.dumps(micro_kwargs(name, CLASSIFIER_KEYS)), "--out", str(tmp_path),
        "--engine", "skip", "--no-uint8-input", *(["--fp16"] if fp16 else []),  # the fixtures' inputs are floats
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "checkpoint adapted" not in result.stdout  # the file's own top-K buffers fit as they are
    manifest = read_manifest(tmp_path)
    assert (manifest.variant, manifest.official_name) == ("focal_fast_tiny", "focalv2_tiny_useconv_patch4_window7_224")
    assert manifest.focal_config["family"] == "focal_fast"
    assert manifest.focal_config["focal_topK"] == 128
    assert manifest.weights.sha256 == sha256_file(case.checkpoint)

    graph = onnx.load(str(tmp_path / manifest.onnx_fp32))
    assert manifest.graph.node_count == len(graph.graph.node)
    assert "Relu" not in {node.op_type for node in graph.graph.node}  # the coordinate MLPs are folded constants

    images = case.images.numpy()
    expected = case.logits.numpy()
    scale = np.abs(expected).max()
    one = _run(tmp_path / manifest.onnx_fp32, images[:1])
    assert np.abs(one - case.logits_b1.numpy()).max() <= RELATIVE_TOLERANCE * scale
    three = [i % len(images) for i in range(3)]  # batch 3 from the fixture's 1 or 2 images
    assert np.abs(_run(tmp_path / manifest.onnx_fp32, images[three]) - expected[three]).max() <= (
        RELATIVE_TOLERANCE * scale
    )
    if fp16:
        assert manifest.precision == "fp16"
        assert manifest.verification["fp16_vs_fp32"]["top1_agreement"] == 1.0


@pytest.mark.anyio
async def test_a_focal_fast_export_is_served(tmp_path: Path) -> None:
    case = load_official_case("v2_micro_224")
    result = run_cli(
        "--variant", "focalv2_tiny_useconv_patch4_window7_224", "--weights", str(case.checkpoint),
        "--model-kwargs", json.dumps(micro_kwargs("v2_micro_224", CLASSIFIER_KEYS)), "--out", str(tmp_path),
        "--engine", "skip",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    async with running_app(create_app(Settings(models=[tmp_path]))) as client:
        response = await client.post("/classify?top_k=3", content=JPEG, headers={"Content-Type": "image/jpeg"})
        models = (await client.get("/v1/models")).json()["models"]
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["predictions"]) == 3
    assert models[0]["variant"] == "focal_fast_tiny"


def _fast_options(out: Path) -> ExportOptions:
    case = load_official_case("v2_micro_224")
    kwargs = micro_kwargs("v2_micro_224", CLASSIFIER_KEYS)
    return ExportOptions(
        variant="focal_fast_tiny", weights=case.checkpoint, model_kwargs=kwargs, out=out, engine="skip"
    )


def test_folding_reaches_the_largest_per_window_bias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Focal-fast's bias is per window ([heads, windows, 49, keys]): at 448 a Focal-fast-T block's is 9.6 M
    elements, beyond the fixed folding limit that suits Focal. The limit follows the model's largest bias;
    here the fixed limit is made smaller than the micro model's biases to show it."""
    monkeypatch.setattr(onnx_export, "FUSED_BIAS_MAX_ELEMENTS", 1000)
    manifest = run_export(_fast_options(tmp_path), log=lambda _: None)
    assert manifest.graph.node_count > 0  # gated: every bias folded


def test_an_export_too_large_for_one_onnx_file_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT_BYTES", 10**6)
    with pytest.raises(ExportError, match=r"beyond what one ONNX file can hold \(2 GiB\); export a smaller input size"):
        run_export(_fast_options(tmp_path), log=lambda _: None)
