"""Detection end to end: `python -m export --task detect`, onnxruntime vs PyTorch, and `POST /detect`
on the real server (a subprocess on onnxruntime CPU, called over HTTP)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch

from export.graph_gate import check_graph
from export.pipeline import ExportError, ExportOptions
from export.verify import compare_selections
from focal.labels import coco_labels
from service.backends.onnxruntime_backend import OnnxRuntimeBackend
from service.backends.torch_backend import TorchBackend
from service.launch import Server, running_server
from tests.conftest import DETECT_CANVAS, HORSE, HORSE_ANCHOR, run_cli
from tests.images import encode, exif_rotated_jpeg, photo
from tests.test_detection import reference_anchors, reference_nms
from tests.test_service import BAD_REQUESTS

Export = tuple[Path, dict[str, Any], str]


def test_detect_export_writes_a_self_describing_folder(detect_export: Export) -> None:
    folder, manifest, stdout = detect_export
    assert (manifest["task"], manifest["input_size"], manifest["num_classes"]) == ("detect", [320, 320], 80)
    assert manifest["random_init"] is True
    assert "RANDOM-INIT" in stdout
    assert (folder / manifest["labels"]).read_text().splitlines() == list(coco_labels())
    assert manifest["preprocess"]["resize"] == "letterbox"
    assert manifest["preprocess"]["canvas"] == [320, 320]
    det = manifest["detection"]
    assert det["anchors"]["per_location"] == 9
    assert det["anchors"]["strides"] == [8, 16, 32, 64, 128]
    assert [lv["size"] for lv in det["levels"]] == [[40, 40], [20, 20], [10, 10], [5, 5], [3, 3]]
    assert det["postprocess"] == {
        "score_threshold": 0.05,
        "nms": "class-aware, greedy",
        "iou_threshold": 0.5,
        "max_detections": 100,
    }
    assert manifest["outputs"] == [{"name": "detections", "dtype": "float32", "shape": ["batch", 5000, 6]}]
    assert manifest["batch"] == {"min": 1, "opt": 2, "max": 8}
    # The same TensorRT op gate as classification, on both served graphs.
    for name in (manifest["onnx_fp32"], manifest["onnx"]):
        check_graph(onnx.load(str(folder / name)))
    assert [o.name for o in onnx.load(str(folder / manifest["onnx_fp32"])).graph.output] == ["detections"]
    assert not list(folder.glob("*.verify.onnx"))  # the verification graph is not left behind
    assert set(manifest["verification"]) == {"fp32_vs_torch", "fp16_vs_fp32"}


def test_fp16_detection_graph_keeps_its_output_and_box_decoding_in_fp32(detect_export: Export) -> None:
    folder, manifest, _ = detect_export
    graph = onnx.load(str(folder / manifest["onnx"]))
    assert manifest["onnx"] == "model.fp16.onnx"
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = ort.InferenceSession(str(folder / manifest["onnx"]), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(3).standard_normal((2, 3, *DETECT_CANVAS), dtype=np.float32)
    rows = session.run(None, {"pixels": pixels})[0]
    assert rows.dtype == np.float32
    # Decoded in fp32, most box coordinates are not fp16 numbers (anchor centres like 128.4587).
    boxes = rows[..., :4]
    inner = boxes[(boxes > 0) & (boxes < DETECT_CANVAS[0])]
    assert np.mean(inner.astype(np.float16).astype(np.float32) != inner) > 0.5
    # The constants of the tail (anchor centres and sizes, clamps) are the fp32 graph's, bit for bit.
    fp32 = onnx.load(str(folder / manifest["onnx_fp32"]))
    values = {init.name: onnx.numpy_helper.to_array(init) for init in fp32.graph.initializer}
    converted = {init.name: onnx.numpy_helper.to_array(init) for init in graph.graph.initializer}
    fp32_nodes = {node.name: node for node in fp32.graph.node}
    checked = 0
    for node in graph.graph.node:
        if node.op_type in ("GatherND", "Clip", "Min", "Max") and node.name in fp32_nodes:
            for source, target in zip(fp32_nodes[node.name].input, node.input, strict=False):
                if source in values and values[source].dtype == np.float32:
                    assert np.array_equal(converted[target], values[source]), (node.name, source)
                    checked += 1
    assert checked >= 20  # 5 levels x (2 anchor gathers + clamps and clips)


def test_onnxruntime_matches_pytorch_at_batch_1_and_3(detect_export: Export) -> None:
    folder, manifest, _ = detect_export
    ort_backend, torch_backend = OnnxRuntimeBackend(folder, manifest), TorchBackend(manifest)
    generator = torch.Generator().manual_seed(7)
    inputs = {b: torch.randn(b, 3, *DETECT_CANVAS, generator=generator).numpy() for b in (1, 3)}
    ours = {b: torch_backend.infer(x) for b, x in inputs.items()}
    theirs = {b: ort_backend.infer(x) for b, x in inputs.items()}
    assert theirs[3].shape == (3, 5000, 6)
    rows = [level["candidates"] for level in manifest["detection"]["levels"]]
    score_diff, agreement = compare_selections(ours, theirs, rows, box_tolerance=1e-3)
    assert score_diff < 1e-5
    assert agreement >= 0.99
    # Each level's rows come sorted by logit (onnxruntime's sigmoid is monotonic only to ~1 ulp),
    # and the class ids are whole numbers in range.
    for start, stop in zip(np.cumsum([0, *rows[:-1]]), np.cumsum(rows), strict=True):
        assert np.diff(theirs[3][:, start:stop, 4], axis=1).max() <= 1e-6
    classes = theirs[3][..., 5]
    assert np.array_equal(classes, np.round(classes))
    assert classes.min() >= 0
    assert classes.max() < 80


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "--task detect needs weights"),
        ({"random_init": True, "image_size": (320, 300)}, "multiples of 32"),
        ({"random_init": True, "model_kwargs": {"num_classes": 3}}, "takes its classes from its checkpoint"),
    ],
)
def test_detect_options_are_checked(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ExportError, match=message):
        ExportOptions(variant="focal_tiny", task="detect", **changes).validate()
    with pytest.raises(ExportError, match="--backbone-weights is for --task detect"):
        ExportOptions(variant="focal_tiny", backbone_weights=Path("x.pth")).validate()


def test_a_classification_checkpoint_given_as_detector_weights_is_refused_clearly(tmp_path: Path) -> None:
    from focal import create_model

    path = tmp_path / "classifier.pth"
    torch.save({"model": create_model("focal_tiny").state_dict()}, path)
    result = run_cli(
        "--variant", "focal_tiny", "--task", "detect", "--weights", str(path), "--image-size", "64x64",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "use --backbone-weights" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def server(constructed_detect_export: Export) -> Iterator[Server]:
    with running_server(constructed_detect_export[0], max_batch_size="4") as srv:
        yield srv


def _post(server: Server, data: bytes, content_type: str = "image/png", **params: Any) -> httpx.Response:
    return httpx.post(
        f"{server.url}/detect", content=data, headers={"Content-Type": content_type}, params=params, timeout=120
    )


def expected_detections(width: int, height: int, resized: tuple[int, int]) -> np.ndarray:
    """What the constructed detector must return for a width x height image, computed plainly:
    each level's first 1000 (HORSE_ANCHOR, HORSE) anchors in location order (all tie; the lower index
    wins), clipped to the canvas, then to the resized image, NMS, and scaled back per axis."""
    boxes = []
    for size, stride in zip([(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)], [8, 16, 32, 64, 128], strict=True):
        anchors = reference_anchors(size, stride)[HORSE_ANCHOR::9][:1000]
        boxes.append(np.clip(anchors, 0, [DETECT_CANVAS[1], DETECT_CANVAS[0]] * 2))
    stacked = np.clip(np.concatenate(boxes), 0, [resized[0], resized[1]] * 2)
    keep = reference_nms(stacked, np.ones(len(stacked)), np.zeros(len(stacked)), 0.5, 100)
    sx, sy = resized[0] / width, resized[1] / height
    return np.asarray(stacked[keep] / [sx, sy, sx, sy])


def test_constructed_detector_boxes_come_back_in_original_pixels(
    server: Server, constructed_detect_export: Export
) -> None:
    _, manifest, _ = constructed_detect_export
    assert (manifest["weights_role"], manifest["random_init"]) == ("detector", False)
    # 121x200 into 320x320: scale 1.6, resized to 194x320 (121 * 1.6 + 0.5 rounds down): sx != sy.
    response = _post(server, encode(photo((121, 200)), "PNG"), score_threshold=0.5)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["image_size"] == [121, 200]
    found = result["detections"]
    assert len(found) == 100
    assert {d["label"] for d in found} == {"horse"}
    assert {d["class_id"] for d in found} == {HORSE}
    for d in found:
        assert math.isclose(d["score"], 1 / (1 + math.exp(-8.0)), rel_tol=1e-6)
    expected = expected_detections(121, 200, (194, 320))
    np.testing.assert_allclose(np.asarray([d["box"] for d in found]), expected, atol=1e-3)
    # The anchors in the canvas's padding end as zero-width boxes on the image's right edge.
    assert any(d["box"][0] == d["box"][2] == 121 for d in found)


@pytest.mark.parametrize("exif_rotated", [False, True])
def test_large_jpeg_decoded_at_reduced_scale_still_maps_to_full_resolution(server: Server, exif_rotated: bool) -> None:
    """A 1400x700 JPEG is decoded at 1/2 scale (JPEG draft: the 320 canvas needs no more), but the
    boxes must refer to the full 1400x700 image; with EXIF orientation, to the upright image."""
    image = photo((1400, 700), seed=4)
    data = exif_rotated_jpeg(image) if exif_rotated else encode(image, "JPEG", quality=90)
    result = _post(server, data, "image/jpeg", score_threshold=0.5).json()["results"][0]
    assert result["image_size"] == [1400, 700]
    expected = expected_detections(1400, 700, (320, 160))
    np.testing.assert_allclose(np.asarray([d["box"] for d in result["detections"]]), expected, atol=5e-3)


def test_detect_parameters_and_several_images(server: Server) -> None:
    wide, tall = encode(photo((400, 100), seed=1), "JPEG"), encode(photo((90, 300), seed=2), "PNG")
    response = httpx.post(
        f"{server.url}/detect",
        files=[("image", ("a.jpg", wide, "image/jpeg")), ("image", ("b.png", tall, "image/png"))],
        params={"max_detections": 7},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["task"] == "detect"
    assert [r["image_size"] for r in body["results"]] == [[400, 100], [90, 300]]
    for result in body["results"]:
        assert len(result["detections"]) == 7
        w, h = result["image_size"]
        for d in result["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w
            assert 0 <= y1 <= y2 <= h
            assert d["label"] in coco_labels()
    # Above every score: nothing.
    assert _post(server, wide, "image/jpeg", score_threshold=1.0).json()["results"][0]["detections"] == []


DETECT_BAD_REQUESTS = [c for c in BAD_REQUESTS if "top_k" not in c[0]] + [
    ("max_detections 0", {"content": b"x", "headers": {"Content-Type": "image/png"}, "params": {"max_detections": 0}},
     422, "invalid_parameter"),
    ("max_detections 101", {"content": b"x", "headers": {"Content-Type": "image/png"},
     "params": {"max_detections": 101}}, 422, "invalid_parameter"),
    ("score_threshold 2", {"content": b"x", "headers": {"Content-Type": "image/png"},
     "params": {"score_threshold": 2}}, 422, "invalid_parameter"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "request_kwargs", "status", "code"), DETECT_BAD_REQUESTS, ids=[c[0] for c in DETECT_BAD_REQUESTS]
)
def test_bad_input_on_detect_gets_its_error_and_the_server_carries_on(
    case: str, request_kwargs: dict[str, Any], status: int, code: str, server: Server
) -> None:
    response = httpx.post(f"{server.url}/detect", timeout=60, **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    assert _post(server, encode(photo((64, 48)), "PNG")).status_code == 200


def test_detect_server_reports_its_model_and_has_no_classifier(server: Server) -> None:
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    assert [(m["task"], m["input_size"], m["weights_role"]) for m in models] == [("detect", [320, 320], "detector")]
    response = httpx.post(f"{server.url}/classify", content=b"x", headers={"Content-Type": "image/png"})
    assert response.status_code == 404
    assert "no classify model is loaded" in response.json()["error"]["message"]
