"""Detection, served: the letterbox and its inverse, NMS and post-processing against plain references,
the route in-process (fake backend), and exact boxes end to end from a constructed detector's real
export (the app in-process over the real onnxruntime backend)."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from export.canvases import canvas_set, mmdetection_input
from focal.anchors import level_sizes
from manifest import DetectionPostprocess
from service.app import create_app
from service.settings import Settings
from service.tasks.detect import Letterbox, Letterboxed, nms, postprocess, resize_linear
from tests.conftest import BUCKET_SCALE, DETECT_CANVAS, HORSE, HORSE_ANCHOR, DetectExport, bucket_detector
from tests.support import (
    JPEG,
    FakeBackend,
    detect_manifest,
    encode,
    exif_rotated_jpeg,
    model_folder,
    photo,
    reference_anchors,
    reference_nms,
    running_app,
    until,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("source", "target"),
    [((480, 640), (427, 320)), ((1080, 1920), (640, 360)), ((100, 37), (320, 865)), ((1, 4000), (1, 320)),
     ((3, 5), (640, 384)), ((701, 1399), (320, 160)), ((480, 640), (640, 480)), ((480, 640), (320, 240)),
     ((201, 300), (288, 193)), ((3024, 4032), (640, 480))],
)  # fmt: skip
def test_letterbox_resize_is_opencv_bilinear_bit_for_bit(source: tuple[int, int], target: tuple[int, int]) -> None:
    """mmdetection resizes with cv2.INTER_LINEAR (no smoothing when shrinking, fixed-point weights):
    the same pixel values, up and down, at the edges and for sizes that do not divide."""
    import cv2

    rng = np.random.default_rng(sum(source) + sum(target))
    for pixels in (rng.integers(0, 256, (*source, 3), dtype=np.uint8), np.asarray(photo(source[::-1]))):
        expected = cv2.resize(pixels, target, interpolation=cv2.INTER_LINEAR).reshape(target[1], target[0], 3)
        np.testing.assert_array_equal(resize_linear(pixels, target), expected)


def test_letterbox_places_the_image_top_left_and_pads_with_the_mean() -> None:
    spec = Letterbox(((320, 320),), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), test_scale=(320, 320))
    assert spec.route(121, 200) == ((320, 320), (194, 320))  # int(121 * 1.6 + 0.5)
    assert spec.route(1, 40000) == ((320, 320), (1, 320))
    boxed = spec.to_canvas(Image.new("RGB", (121, 200), (255, 255, 255)))
    assert (boxed.image_size, boxed.resized, boxed.scale) == ((121, 200), (194, 320), (194 / 121, 1.6))
    white = (1 - np.asarray(spec.mean)) / np.asarray(spec.std)
    np.testing.assert_allclose(
        boxed.pixels[:, :, :194], np.broadcast_to(white[:, None, None], (3, 320, 194)), rtol=1e-6
    )
    assert not boxed.pixels[:, :, 194:].any()  # zero after normalisation: the mean colour


@pytest.mark.parametrize("seed", range(40))
def test_nms_matches_the_reference_with_ties_and_degenerate_boxes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(0, 40, (n, 2))
    wh[rng.random(n) < 0.1] = 0  # points
    wh[rng.random(n) < 0.05, 0] = 0  # zero-width lines
    boxes = np.concatenate([xy, xy + wh], axis=1)
    dupes = rng.random(n) < 0.1  # exact duplicates of another box
    boxes[dupes] = boxes[rng.integers(0, n, int(dupes.sum()))]
    scores = np.round(rng.random(n), 1)  # few distinct values: many ties
    classes = rng.integers(0, 4, n).astype(np.float32)
    threshold, limit = float(rng.choice([0.0, 0.3, 0.5, 0.7])), int(rng.choice([5, 100]))
    got = nms(boxes, scores, classes, threshold, limit).tolist()
    assert got == reference_nms(boxes, scores, classes, threshold, limit)


def test_nms_edge_cases() -> None:
    empty = np.zeros((0, 4))
    assert nms(empty, np.zeros(0), np.zeros(0), 0.5, 100).tolist() == []
    same = np.asarray([[0, 0, 10, 10]] * 3, dtype=np.float64)
    # Identical boxes: one survives per class; equal scores keep the first row.
    assert nms(same, np.asarray([0.5, 0.5, 0.5]), np.asarray([0, 1, 0]), 0.5, 100).tolist() == [0, 1]
    # A NaN class (a broken backend) is its own class rather than a crash.
    assert nms(same, np.asarray([0.5, 0.4, 0.3]), np.asarray([np.nan, 0, np.nan]), 0.5, 100).tolist()[:2] == [0, 1]
    # IoU exactly at the threshold is kept (suppression needs IoU > threshold).
    half = np.asarray([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=np.float64)
    assert nms(half, np.asarray([0.9, 0.8]), np.zeros(2), 0.5, 100).tolist() == [0, 1]


def test_postprocess_thresholds_maps_back_and_clips() -> None:
    settings = DetectionPostprocess(score_threshold=0.05, nms="class-aware", iou_threshold=0.5, max_detections=100)
    rows = np.asarray(
        [
            [10, 20, 50, 60, 0.9, 3],
            [12, 20, 50, 60, 0.8, 3],  # overlaps the first, same class: suppressed
            [12, 20, 50, 60, 0.7, 4],  # another class: kept
            [100, 100, 200, 500, 0.6, 1],  # reaches into the padding: clipped to the image
            [0, 0, 5, 5, 0.05, 2],  # at the export's threshold: dropped
        ],
        dtype=np.float32,
    )
    # A 100x200 (w x h) image letterboxed into 320x320: resized to 160x320, scale 1.6.
    placed = Letterboxed(np.zeros(0), (100, 200), (160, 320), (1.6, 1.6))
    found = postprocess(rows, placed, settings)
    assert [f[5] for f in found] == [3, 4, 1]
    np.testing.assert_allclose(found[0][:4], [10 / 1.6, 20 / 1.6, 50 / 1.6, 60 / 1.6])
    np.testing.assert_allclose(found[2][:4], [100 / 1.6, 100 / 1.6, 100, 200])
    assert [f[5] for f in postprocess(rows, placed, settings, 0.65)] == [3, 4]
    assert len(postprocess(rows, placed, settings, max_detections=1)) == 1


def test_flat_boxes_in_the_padding_never_crowd_out_detections() -> None:
    """The case found against mmdetection: candidates wholly in the letterbox's padding clip to flat boxes
    (e.g. [412.2, 300, 500, 300]); they overlap nothing, so NMS kept them, and 8 of them in the top 100
    pushed real detections out. They are dropped before NMS, as mmdetection does."""
    settings = DetectionPostprocess(score_threshold=0.05, nms="class-aware", iou_threshold=0.5, max_detections=3)
    flat = [[412.2 + i, 300 + 10 * i, 500, 320 + 10 * i, 0.9 - 0.01 * i, i] for i in range(8)]  # below y=300
    real = [[10, 10, 100, 100, 0.5, 1], [200, 50, 300, 200, 0.4, 2], [50, 150, 90, 250, 0.3, 3]]
    sideways = [[520, 10, 600, 90, 0.95, 5]]  # right of the image, in the padding: flat in x
    rows = np.asarray(flat + real + sideways, dtype=np.float32)
    # A 1000x600 image letterboxed into 640x640: resized to 500x300, scale 0.5.
    placed = Letterboxed(np.zeros(0), (1000, 600), (500, 300), (0.5, 0.5))
    found = postprocess(rows, placed, settings)
    assert [f[5] for f in found] == [1, 2, 3]
    assert all(f[2] > f[0] and f[3] > f[1] for f in found)


def test_to_image_inverts_to_canvas() -> None:
    """A box drawn on the image lands where the letterbox put it, and maps back to where it was drawn."""
    spec = Letterbox(canvases=((64, 96),), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), test_scale=(96, 64))
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (60, 20, 150, 80))  # x1, y1, x2, y2
    placed = spec.to_canvas(image)
    assert (placed.resized, placed.scale) == ((96, 32), (96 / 300, 32 / 100))
    lit = np.argwhere(placed.pixels[0] > 0.9)  # (y, x) on the canvas
    canvas_box = np.asarray([[lit[:, 1].min(), lit[:, 0].min(), lit[:, 1].max() + 1, lit[:, 0].max() + 1]])
    np.testing.assert_allclose(Letterbox.to_image(canvas_box, placed)[0], [60, 20, 150, 80], atol=300 / 96)
    # Outside the image (the padding) clips to its edge.
    np.testing.assert_allclose(Letterbox.to_image(np.asarray([[90.0, 40, 96, 64]]), placed)[0], [281.25, 100, 300, 100])


# -- the route, in-process with a fake backend ---------------------------------------------------------
def _rows(batch: np.ndarray) -> np.ndarray:
    """Two candidates per image: class 1 at (8, 8, 40, 40), score 0.9, and class 2 reaching into the
    padding below a wide image, score 0.6; the rest below every threshold."""
    rows = np.zeros((len(batch), 20, 6), np.float32)
    rows[:, 0] = [8, 8, 40, 40, 0.9, 1]
    rows[:, 1] = [40, 24, 56, 48, 0.6, 2]
    return rows


async def test_detections_in_image_pixels_with_labels_and_bounded_parameters(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, detect_manifest(canvas=(64, 64)))
    wide = encode(photo((256, 128)), "PNG")  # into 64x64: resized to 64x32, scale 0.25
    async with running_app(create_app(Settings(models=[folder]), lambda *_: FakeBackend(_rows))) as client:
        response = await client.post("/detect?score_threshold=0.5", content=wide, headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert result["image_size"] == [256, 128]
        assert result["detections"][0] == {"class_id": 1, "label": "label_1", "score": pytest.approx(0.9),
                                           "box": pytest.approx([32, 32, 160, 128])}  # fmt: skip
        assert result["detections"][1]["box"] == pytest.approx([160, 96, 224, 128])  # clipped to the image
        high = await client.post("/detect?score_threshold=0.7", content=wide, headers={"Content-Type": "image/png"})
        assert [d["class_id"] for d in high.json()["results"][0]["detections"]] == [1]
        capped = await client.post("/detect?max_detections=6", content=JPEG, headers={"Content-Type": "image/jpeg"})
        models = (await client.get("/v1/models")).json()["models"]
    assert capped.status_code == 422
    assert "max_detections: must be at most 5" in capped.json()["error"]["message"]
    assert [(m["task"], m["input_size"], m["weights_role"]) for m in models] == [("detect", [64, 64], "detector")]


# -- exact boxes, end to end on a real export -------------------------------------------------------------
def expected_detections(width: int, height: int, resized: tuple[int, int], limit: int = 100) -> np.ndarray:
    """What the constructed detector must return for a width x height image, computed plainly:
    each level's first 1000 (HORSE_ANCHOR, HORSE) anchors in location order (all tie; the lower index
    wins), clipped to the canvas, then to the resized image, the ones left flat (wholly in the padding)
    dropped, NMS, and scaled back per axis."""
    boxes = []
    for size, stride in zip(level_sizes(DETECT_CANVAS), [8, 16, 32, 64, 128], strict=True):
        anchors = reference_anchors(size, stride)[HORSE_ANCHOR::9][:1000]
        boxes.append(np.clip(anchors, 0, [DETECT_CANVAS[1], DETECT_CANVAS[0]] * 2))
    stacked = np.clip(np.concatenate(boxes), 0, [resized[0], resized[1]] * 2)
    stacked = stacked[(stacked[:, 2] > stacked[:, 0]) & (stacked[:, 3] > stacked[:, 1])]
    keep = reference_nms(stacked, np.ones(len(stacked)), np.zeros(len(stacked)), 0.5, limit)
    sx, sy = resized[0] / width, resized[1] / height
    return np.asarray(stacked[keep] / [sx, sy, sx, sy])


async def test_constructed_detector_boxes_come_back_in_original_pixels(detect_export: DetectExport) -> None:
    """A 121x200 PNG into 128x128: scale 0.64, resized to 77x128 (sx != sy). A 1400x700 JPEG is
    decoded at reduced scale (JPEG draft: the canvas needs no more), but its boxes must refer to the
    full image; with EXIF orientation, to the upright image. The best 40 are compared: every candidate
    ties, and in the coarse levels the TopK kernel orders tied candidates its own way, which the plain
    reference (location order) does not reproduce. Once flat boxes no longer take places, NMS reaches
    those levels: the two orders part at the 49th and 63rd detection of these images, not before."""
    large = photo((1400, 700), seed=4)
    cases: list[tuple[bytes, str, tuple[int, int], tuple[int, int]]] = [
        (encode(photo((121, 200)), "PNG"), "image/png", (121, 200), (77, 128)),
        (encode(large, "JPEG", quality=90), "image/jpeg", (1400, 700), (128, 64)),
        (exif_rotated_jpeg(large), "image/jpeg", (1400, 700), (128, 64)),
    ]
    async with running_app(create_app(Settings(models=[detect_export.folder], max_batch_size=4))) as client:
        responses = [
            await client.post(
                "/detect?score_threshold=0.5&max_detections=40", content=data, headers={"Content-Type": kind}
            )
            for data, kind, _, _ in cases
        ]
        files = [("image", ("a.png", cases[0][0], "image/png")), ("image", ("b.jpg", cases[1][0], "image/jpeg"))]
        several = await client.post("/detect", files=files, params={"max_detections": 7})
        nothing = await client.post(
            "/detect?score_threshold=1", content=cases[0][0], headers={"Content-Type": "image/png"}
        )
    for response, (_, _, size, resized) in zip(responses, cases, strict=True):
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()["results"][0]
        assert result["image_size"] == list(size)
        found = result["detections"]
        assert {(d["label"], d["class_id"]) for d in found} == {("horse", HORSE)}
        assert all(d["score"] == pytest.approx(1 / (1 + np.exp(-8.0)), rel=1e-6) for d in found)
        expected = expected_detections(*size, resized, limit=40)
        assert len(found) == len(expected) == 40
        np.testing.assert_allclose(np.asarray([d["box"] for d in found]), expected, atol=5e-3)
    assert [r["image_size"] for r in several.json()["results"]] == [[121, 200], [1400, 700]]
    assert all(len(r["detections"]) == 7 for r in several.json()["results"])
    assert nothing.json()["results"][0]["detections"] == []


# -- canvas buckets: routing, and mmdetection's predict on the same checkpoint ---------------------------
def test_the_640_set_routes_common_photos_to_mmdetections_own_input_size() -> None:
    """At scale 640x640 mmdetection feeds a 4:3 photo as 480x640, a 16:9 one as 384x640 (360 padded to
    32), ...: each lands on exactly that canvas, resized as mmdetection resizes it."""
    spec = Letterbox(canvases=tuple(canvas_set((640, 640))), mean=(0.5,) * 3, std=(0.5,) * 3, test_scale=(640, 640))
    cases = {  # (width, height) -> (canvas (h, w), resized (w, h)), by hand
        (4032, 3024): ((480, 640), (640, 480)),
        (3024, 4032): ((640, 480), (480, 640)),
        (1920, 1080): ((384, 640), (640, 360)),
        (1080, 1920): ((640, 384), (360, 640)),
        (6000, 4000): ((448, 640), (640, 427)),
        (1080, 1080): ((640, 640), (640, 640)),
        (100, 50): ((384, 640), (640, 320)),  # upscaled, as mmdetection does; no 320x640 canvas: the next
        (5000, 1000): ((384, 640), (640, 128)),  # 5:1 has no canvas of its own: the smallest that holds it
    }
    for (width, height), expected in cases.items():
        assert spec.route(width, height) == expected, (width, height)


def test_an_image_no_canvas_holds_is_fitted_where_it_comes_out_largest() -> None:
    """At the paper's scale a 1.7:1 image resizes to 1333x784, which neither 768x1344 nor 800x1216 holds:
    it is fitted into 800x1344 (the canvas that holds any landscape image) when the set has it, and
    otherwise shrunk into the canvas where it stays largest."""
    paper = canvas_set((1333, 800))
    spec = Letterbox(canvases=tuple(paper), mean=(0.5,) * 3, std=(0.5,) * 3, test_scale=(1333, 800))
    assert spec.route(1700, 1000) == ((800, 1344), (1333, 784))
    without = tuple(c for c in paper if c not in ((800, 1344), (1344, 800)))
    spec = Letterbox(canvases=without, mean=(0.5,) * 3, std=(0.5,) * 3, test_scale=(1333, 800))
    # 768x1344: fitted to 1306x768 (1.0M px); 800x1216: 1216x715 (0.87M px).
    assert spec.route(1700, 1000) == ((768, 1344), (1306, 768))


def mmdetection_predict(model: Any, image: np.ndarray, scale: tuple[int, int]) -> tuple[np.ndarray, dict[str, int]]:
    """mmdetection 3.x's RetinaNet `predict`, written out from its documented test pipeline and config:
    `Resize(scale, keep_ratio=True)` (cv2 bilinear), normalise, pad to a multiple of 32 with 0; the head;
    per level the scores above `score_thr` 0.05, the best `nms_pre` 1000 of them, decoded (DeltaXYWH, means
    0, stds 1, wh_ratio_clip 16/1000) and clipped to the resized image; all levels rescaled to the
    original image, boxes of width or height <= `min_bbox_size` 0 dropped, class-aware NMS at IoU 0.5,
    the best 100. Returns rows (x1, y1, x2, y2, score, class) and counts of what was dropped where."""
    import cv2
    import torch

    height, width = image.shape[:2]
    factor = min(scale[0] / max(width, height), scale[1] / min(width, height))
    new_w, new_h = int(width * factor + 0.5), int(height * factor + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    normalised = (resized - np.asarray([123.675, 116.28, 103.53])) / np.asarray([58.395, 57.12, 57.375])
    padded = np.zeros((-(-new_h // 32) * 32, -(-new_w // 32) * 32, 3), np.float32)
    padded[:new_h, :new_w] = normalised
    assert tuple(padded.shape[:2]) == model.canvas
    with torch.inference_mode():
        raw = model.forward_raw(torch.from_numpy(padded.transpose(2, 0, 1)[None].copy()))
    found, flat = [], 0
    for (logits, deltas), size, stride in zip(raw, model.level_sizes, [8, 16, 32, 64, 128], strict=True):
        scores = 1 / (1 + np.exp(-logits[0].double().numpy()))  # [anchors, classes]
        anchors = reference_anchors(size, stride)
        anchor_ids, class_ids = np.nonzero(scores > 0.05)
        kept = scores[anchor_ids, class_ids]
        order = np.argsort(-kept, kind="stable")[:1000]
        for a, c, score in zip(anchor_ids[order], class_ids[order], kept[order], strict=True):
            (x1, y1, x2, y2), (dx, dy, dw, dh) = anchors[a], deltas[0, a].double().numpy()
            w, h = x2 - x1, y2 - y1
            cx, cy = (x1 + x2) / 2 + dx * w, (y1 + y2) / 2 + dy * h
            limit = abs(np.log(16 / 1000))
            w, h = w * np.exp(np.clip(dw, -limit, limit)), h * np.exp(np.clip(dh, -limit, limit))
            box = np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, [new_w, new_h, new_w, new_h])
            sx, sy = new_w / width, new_h / height
            found.append([*(box / np.asarray([sx, sy, sx, sy])), score, c])
    rows = np.asarray(found)
    solid = (rows[:, 2] - rows[:, 0] > 0) & (rows[:, 3] - rows[:, 1] > 0)
    flat = int((~solid).sum())
    rows = rows[solid]
    keep = reference_nms(rows[:, :4], rows[:, 4], rows[:, 5], 0.5, 100)
    return rows[keep], {"candidates": len(found), "flat": flat}


async def test_detections_equal_mmdetections_predict_where_the_canvas_is_its_input_size(
    bucket_export: DetectExport,
) -> None:
    """Images whose mmdetection input (resized at 288x224, padded to 32) is one of the export's canvases:
    a 300x201 photo (288x193 in a 224x288 canvas: 31 rows of padding, where candidates clip to flat boxes),
    its portrait twin, and a square one. /detect, on the real export through onnxruntime, returns the same
    detections as `mmdetection_predict` on the checkpoint: the same set, boxes within 0.01 px, scores
    within 1e-4. A 16:9 photo (mmdetection's 192x288 is no canvas) goes to the 224x288 canvas at the
    same resized size."""
    from focal.checkpoint import read_state_dict
    from focal.detection import load_detection_checkpoint

    state = read_state_dict(bucket_export.checkpoint)
    cases = [((300, 201), (224, 288)), ((201, 300), (288, 224)), ((250, 250), (224, 224)), ((320, 180), (224, 288))]
    async with running_app(create_app(Settings(models=[bucket_export.folder]))) as client:
        for (width, height), canvas in cases:
            image = photo((width, height), seed=width + height)
            response = await client.post(
                "/detect?score_threshold=0.05", content=encode(image, "PNG"), headers={"Content-Type": "image/png"}
            )
            assert response.status_code == 200, response.text
            result = response.json()["results"][0]
            assert result["canvas"] == list(canvas)
            if canvas != mmdetection_input(width, height, BUCKET_SCALE):
                assert result["resized"] == [288, 162]  # mmdetection's resize; more padding than its 192 rows
                continue
            model = bucket_detector(canvas)
            load_detection_checkpoint(model, state)
            expected, counts = mmdetection_predict(model.eval(), np.asarray(image), BUCKET_SCALE)
            got = np.asarray([[*d["box"], d["score"], d["class_id"]] for d in result["detections"]])
            assert len(got) == len(expected) == 100, (canvas, counts)
            np.testing.assert_array_equal(got[:, 5], expected[:, 5])
            np.testing.assert_allclose(got[:, 4], expected[:, 4], atol=1e-4)
            np.testing.assert_allclose(got[:, :4], expected[:, :4], atol=0.01)
            if canvas == (224, 288):
                assert counts["flat"] > 0, counts  # the padding case: flat boxes were there to drop


async def test_each_canvas_has_its_own_batches_and_the_response_says_which(tmp_path: Path) -> None:
    """Two canvases, 64x96 and 96x64 (test scale 96x64): a wide image goes to the first, a tall one to the
    second, each canvas's samples to its own backend (a batch never mixes canvases), and the response,
    /v1/models and the Open Inference Protocol say which canvases there are."""
    manifest = detect_manifest(canvas=(64, 96), more_canvases=((96, 64),))
    folder = model_folder(tmp_path, manifest)
    backends: list[FakeBackend] = []

    def rows(batch: np.ndarray) -> np.ndarray:
        out = _rows(batch)
        out[:, 1] = [40, 70, 80, 90, 0.6, 2]  # inside a 96x64 canvas once clipped; below a 64x96 one (flat)
        return out

    def loader(*_: Any) -> FakeBackend:
        backends.append(FakeBackend(rows))
        return backends[-1]

    wide, tall = encode(photo((256, 128)), "PNG"), encode(photo((128, 256)), "PNG")
    files = [("image", ("w.png", wide, "image/png")), ("image", ("t.png", tall, "image/png"))] * 2
    async with running_app(create_app(Settings(models=[folder]), loader)) as client:
        both = await client.post("/detect", files=files)
        models = (await client.get("/v1/models")).json()["models"]
        url = "/v2/models/focal_tiny_retinanet"
        metadata = (await client.get(url)).json()
        canvas = {"name": "pixels", "datatype": "FP32", "shape": [1, 3, 96, 64], "data": [0.0] * 96 * 64 * 3}
        sent = (await client.post(f"{url}/infer", json={"inputs": [canvas]})).json()
        square = {**canvas, "shape": [1, 3, 64, 64], "data": [0.0] * 64 * 64 * 3}
        refused = await client.post(f"{url}/infer", json={"inputs": [square]})
    assert both.status_code == 200, both.text
    results = both.json()["results"]
    assert [(r["canvas"], r["resized"]) for r in results] == [([64, 96], [96, 48]), ([96, 64], [48, 96])] * 2
    assert results[1]["detections"][0]["box"] == pytest.approx(
        [8 * 128 / 48, 8 * 256 / 96, 40 * 128 / 48, 40 * 256 / 96]
    )
    assert [b.shapes for b in backends] == [{(3, 64, 96)}, {(3, 96, 64)}]
    assert models[0]["canvases"] == [[64, 96], [96, 64]]
    assert models[0]["input_size"] == [64, 96]
    assert metadata["inputs"][0]["shape"] == [-1, 3, -1, -1]
    found = {o["name"]: o for o in sent["outputs"]}["detections"]["data"]
    assert found[:6] == pytest.approx([8, 8, 40, 40, 0.9, 1])  # in the 96x64 canvas's pixels
    assert found[6:10] == pytest.approx([40, 70, 64, 90])  # clipped to that canvas's 64-pixel width
    assert refused.status_code == 400
    assert "canvases are 64x96, 96x64" in refused.json()["error"]


def test_the_torch_backend_builds_each_canvas_at_its_own_size(bucket_export: DetectExport) -> None:
    """The reference backend (PyTorch, from the export's checkpoint) agrees with each canvas's ONNX graph."""
    import onnxruntime as ort

    from service.backends.torch_backend import TorchBackend

    rng = np.random.default_rng(1)
    for view in bucket_export.manifest.canvas_views():
        batch = rng.standard_normal((1, 3, *view.input_size), dtype=np.float32)
        session = ort.InferenceSession(str(bucket_export.folder / view.onnx_fp32), providers=["CPUExecutionProvider"])
        expected = session.run(None, {"pixels": batch})[0]
        got = TorchBackend(view).infer(batch)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got[..., 4], expected[..., 4], atol=1e-4)


async def test_a_models_canvases_take_turns_on_a_cpu_and_share_one_backend_kind(tmp_path: Path) -> None:
    """On a CPU each run uses every core, so a model's canvases never run at once. A model whose canvases
    would load on different backends (TensorRT for some, a fallback for others) runs all on onnxruntime."""
    manifest = detect_manifest(canvas=(64, 96), more_canvases=((96, 64),))
    folder = model_folder(tmp_path, manifest)
    running, most = 0, 0
    lock = threading.Lock()

    def rows(batch: np.ndarray) -> np.ndarray:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return _rows(batch)

    choices: list[str] = []

    def loader(checked: Any, settings: Settings) -> FakeBackend:
        choices.append(settings.backend)
        backend = FakeBackend(rows, max_batch_size=1)
        if settings.backend == "auto" and checked.manifest.input_size == (96, 64):
            backend.name = "tensorrt"  # this canvas's engine loaded, the other's did not
        return backend

    wide, tall = encode(photo((256, 128)), "PNG"), encode(photo((128, 256)), "PNG")
    async with running_app(create_app(Settings(models=[folder]), loader)) as client:
        posts = [
            client.post("/detect", content=body, headers={"Content-Type": "image/png"}) for body in [wide, tall] * 4
        ]
        answers = await asyncio.gather(*posts)
        model = (await client.get("/v1/models")).json()["models"][0]
    assert all(a.status_code == 200 for a in answers)
    assert most == 1
    assert choices == ["auto", "auto", "onnxruntime", "onnxruntime"]
    assert model["backend"] == "fake"


async def test_jpeg_draft_decoding_can_be_turned_off_for_full_decodes(tmp_path: Path) -> None:
    """With FOCAL_JPEG_DRAFT=false a large JPEG is decoded in full, then resized: exactly the pixels of
    mmdetection's pipeline (decode, resize); with draft decoding (the default) they differ."""
    folder = model_folder(tmp_path, detect_manifest(canvas=(64, 64)))
    seen: list[np.ndarray] = []

    def rows(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return _rows(batch)

    large = encode(photo((800, 600), seed=2), "JPEG", quality=95)
    spec = Letterbox.from_manifest(detect_manifest(canvas=(64, 64)))
    full = spec.to_canvas(Image.open(io.BytesIO(large)).convert("RGB")).pixels
    for draft in (False, True):
        app = create_app(Settings(models=[folder], jpeg_draft=draft), lambda *_: FakeBackend(rows))
        async with running_app(app) as client:
            answer = await client.post("/detect", content=large, headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 200
        assert np.array_equal(seen[-1][0], full) is not draft


async def test_a_canvas_waiting_for_its_turn_is_not_a_busy_backend(tmp_path: Path) -> None:
    """While one canvas's batch runs, another canvas's batch waits for the turn: it is pending (drain waits
    for it), but its clock has not started, so a long wait never reads as a stuck backend."""
    folder = model_folder(tmp_path, detect_manifest(canvas=(64, 96), more_canvases=((96, 64),)))
    backends: list[FakeBackend] = []

    def loader(*_: Any) -> FakeBackend:
        backends.append(FakeBackend(_rows))
        return backends[-1]

    app = create_app(Settings(models=[folder]), loader)
    wide, tall = encode(photo((256, 128)), "PNG"), encode(photo((128, 256)), "PNG")
    async with running_app(app) as client:
        model = app.state.service.models["focal_tiny_retinanet"]
        first, second = model.batchers
        warm_up = list(backends[1].sizes)
        backends[0].hold = threading.Event()
        held = asyncio.ensure_future(client.post("/detect", content=wide, headers={"Content-Type": "image/png"}))
        await until(lambda: first.busy_for() > 0)
        waiting = asyncio.ensure_future(client.post("/detect", content=tall, headers={"Content-Type": "image/png"}))
        await until(lambda: len(second._forming) == 1)
        await asyncio.sleep(0.05)
        assert second.busy_for() == 0.0
        assert first.busy_for() >= 0.05
        assert backends[1].sizes == warm_up
        backends[0].hold.set()
        answers = await asyncio.gather(held, waiting)
    assert [a.status_code for a in answers] == [200, 200]
    assert backends[1].sizes == [*warm_up, 1]


async def test_a_broken_canvas_makes_the_model_unready_and_its_probe_must_succeed(tmp_path: Path) -> None:
    """One canvas's backend fails while the other works: the model turns unready however many requests
    the good canvas answers, its probes try every canvas, and it is ready once the broken one runs."""
    folder = model_folder(tmp_path, detect_manifest(canvas=(64, 96), more_canvases=((96, 64),)))
    backends: list[FakeBackend] = []

    def loader(*_: Any) -> FakeBackend:
        backends.append(FakeBackend(_rows))
        return backends[-1]

    settings = Settings(models=[folder], failing_after_batches=2, probe_backoff_s=0.02)
    wide, tall = encode(photo((256, 128)), "PNG"), encode(photo((128, 256)), "PNG")
    async with running_app(create_app(settings, loader)) as client:
        backends[1].failing = "engine lost"
        for _ in range(2):
            assert (
                await client.post("/detect", content=wide, headers={"Content-Type": "image/png"})
            ).status_code == 200
            failed = await client.post("/detect", content=tall, headers={"Content-Type": "image/png"})
            assert failed.status_code == 500
        assert (await client.get("/readyz")).status_code == 503
        probed = len(backends[1].sizes)
        await until(lambda: len(backends[1].sizes) >= probed + 2)  # probes reach the broken canvas
        assert (await client.get("/readyz")).status_code == 503  # the good canvas's probes do not recover it
        backends[1].failing = None
        await until(lambda: len(backends[1].sizes) >= probed + 3)
        for _ in range(100):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/readyz")).status_code == 200
