"""uint8 input (`export.uint8`, the default for classifiers): the graph prefix, its verification, the
graph gate's rule for it, the manifest, and the service serving the same answers as the float path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.graph_gate import inspect_graph
from export.options import ExportError, ExportOptions
from export.pipeline import run_export
from export.uint8 import normalise, uint8_images, verify_uint8_input, with_uint8_input
from export.verify import VerificationError, run_onnx
from manifest import MANIFEST_NAME, ManifestError, read_manifest
from service.app import create_app
from service.settings import Settings
from tests.support import (
    CLASSIFIER_KEYS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    classify_manifest,
    encode,
    load_official_case,
    micro_kwargs,
    photo,
    running_app,
)

pytestmark = pytest.mark.anyio


def _scaling_graph() -> onnx.ModelProto:
    """pixels [N,3,4,4] float32 -> out = pixels * 2 (a stand-in for a model)."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    node = helper.make_node("Mul", ["pixels", "two"], ["out"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [two],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_the_prefix_normalises_as_the_host_does() -> None:
    graph = _scaling_graph()
    uint8 = with_uint8_input(graph, IMAGENET_MEAN, IMAGENET_STD)
    assert uint8.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert [n.op_type for n in uint8.graph.node] == ["Cast", "Mul", "Add", "Mul"]
    images = uint8_images((4, 4))
    got = run_onnx(uint8, images)
    expected = run_onnx(graph, {b: normalise(x, IMAGENET_MEAN, IMAGENET_STD) for b, x in images.items()})
    for b in images:
        np.testing.assert_allclose(got[b][0], expected[b][0], rtol=0, atol=2e-6)
    assert images[3].min() == 0
    assert images[3].max() == 255
    report = verify_uint8_input(graph, uint8, (4, 4), IMAGENET_MEAN, IMAGENET_STD)
    assert report["relative_diff"] < 1e-6
    # A prefix with the wrong statistics is caught.
    wrong = with_uint8_input(graph, (0.5, 0.5, 0.5), IMAGENET_STD)
    with pytest.raises(VerificationError, match="uint8-input graph differs"):
        verify_uint8_input(graph, wrong, (4, 4), IMAGENET_MEAN, IMAGENET_STD)


def test_the_gate_takes_a_uint8_input_only_straight_into_a_cast() -> None:
    assert inspect_graph(with_uint8_input(_scaling_graph(), IMAGENET_MEAN, IMAGENET_STD)).ok
    graph = _scaling_graph()
    graph.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8  # a Mul reads the uint8 input
    assert any("uint8 input must go straight into Cast" in p for p in inspect_graph(graph).problems)


def test_a_manifest_must_say_who_normalises(tmp_path: Path) -> None:
    data = classify_manifest().model_dump(mode="json")
    data["input"]["dtype"] = "uint8"  # uint8 pixels, but the host is said to normalise
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="uint8 with normalise: host"):
        read_manifest(tmp_path)
    data["preprocess"]["normalise"] = "graph"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(tmp_path).preprocess.normalise == "graph"


def test_detection_does_not_offer_uint8_input() -> None:
    opts = ExportOptions(variant="focal_tiny", task="detect", random_init=True, uint8_input=True)
    with pytest.raises(ExportError, match="letterbox pads with the colour that normalises to zero"):
        opts.validate()
    assert not ExportOptions(variant="focal_tiny", task="detect", random_init=True).input_uint8
    assert ExportOptions(variant="focal_tiny", random_init=True).input_uint8


async def test_uint8_and_float_exports_serve_the_same_top_5(tmp_path: Path) -> None:
    """The same checkpoint exported both ways: the same top-5 classes and scores for photos of several
    sizes; the float export's manifest is one an older reader takes (no `normalise` field)."""
    case = load_official_case("micro_224")
    folders = {}
    for uint8 in (True, False):
        opts = ExportOptions(
            variant="focal_tiny",
            weights=case.checkpoint,
            model_kwargs=micro_kwargs("micro_224", CLASSIFIER_KEYS),
            out=tmp_path / ("uint8" if uint8 else "float"),
            engine="skip",
            uint8_input=uint8,
        )
        manifest = run_export(opts, log=lambda _: None)
        assert manifest.input.dtype == ("uint8" if uint8 else "float32")
        folders[uint8] = opts.out
    assert "normalise" not in (folders[False] / MANIFEST_NAME).read_text()
    assert '"normalise": "graph"' in (folders[True] / MANIFEST_NAME).read_text()

    sizes = [(320, 240), (240, 320), (640, 480), (224, 224), (1000, 300)]
    images = [encode(photo(size, seed=i), "JPEG", quality=90) for i, size in enumerate(sizes)]
    answers: dict[bool, list[list[dict[str, Any]]]] = {}
    for uint8, folder in folders.items():
        async with running_app(create_app(Settings(models=[folder], grpc_port=0))) as client:
            answers[uint8] = []
            for image in images:
                response = await client.post("/classify?top_k=5", content=image, headers={"Content-Type": "image/jpeg"})
                assert response.status_code == 200, response.text
                answers[uint8].append(response.json()["results"][0]["predictions"])
    for got, expected in zip(answers[True], answers[False], strict=True):
        assert [p["class_id"] for p in got] == [p["class_id"] for p in expected]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(got, expected, strict=True)) < 1e-5
