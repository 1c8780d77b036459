"""Classification, served: the centre-crop transform, the route's behaviour in-process (fake backend),
and its numbers end to end on a real export (the app in-process over the real onnxruntime backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.app import create_app
from service.images import decode
from service.settings import Settings
from service.tasks.classify import CenterCrop, softmax
from tests.conftest import ClassifyExport
from tests.support import (
    JPEG,
    FakeBackend,
    classify_manifest,
    encode,
    exif_rotated_jpeg,
    fixed_logits,
    model_folder,
    photo,
    running_app,
)

pytestmark = pytest.mark.anyio
SPEC = CenterCrop(resize_to_cover=(256, 256), crop=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_jpeg_draft_decodes_large_photos_at_reduced_scale_but_covers_the_target() -> None:
    data = encode(photo((1920, 1080)), "JPEG", quality=90)
    image = decode(data, 10**7, draft_short_side=256)
    assert min(image.size) >= 256
    assert image.size[0] < 1920  # decoded at 1/2 or 1/4 scale
    full = SPEC.to_canvas(decode(data, 10**7)).pixels
    drafted = SPEC.to_canvas(image).pixels
    assert np.abs(full - drafted).mean() < 0.1  # normalised units: a small resampling difference


def test_preprocess_matches_the_official_eval_transform() -> None:
    """Resize short side to 256 (bicubic), centre crop 224, /255, mean/std, CHW - computed by hand here."""
    image = photo((300, 200))
    out = SPEC.to_canvas(image).pixels
    assert out.shape == (3, 224, 224)
    assert out.dtype == np.float32
    resized = image.resize((384, 256), Image.Resampling.BICUBIC)  # 300x200 -> short side 256
    left, top = round((384 - 224) / 2), round((256 - 224) / 2)
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 255
    expected = ((crop - np.array(SPEC.mean, np.float32)) / np.array(SPEC.std, np.float32)).transpose(2, 0, 1)
    assert np.allclose(out, expected, atol=1e-6)


def test_non_square_crops_cover_both_sides() -> None:
    """256x320 crop: resized to cover 292x365 whatever the image's shape, so no padding is needed."""
    spec = CenterCrop(resize_to_cover=(292, 365), crop=(256, 320), mean=SPEC.mean, std=SPEC.std)
    for size in ((300, 600), (600, 300), (500, 500)):
        out = spec.to_canvas(photo(size)).pixels
        assert out.shape == (3, 256, 320)
        black = ((0 - np.array(spec.mean)) / np.array(spec.std)).reshape(3, 1, 1)
        assert not np.isclose(out, black, atol=1e-4).all(axis=0).any()  # no zero-padded border pixel


def test_extreme_aspect_ratios_are_cheap() -> None:
    """A 1x40000 strip: only the cropped region is ever resized (not a 256 x 10,240,000 image)."""
    import resource
    import time

    strip = Image.new("RGB", (1, 40000), (10, 200, 30))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = SPEC.to_canvas(decode(encode(strip, "PNG"), 10**7)).pixels
    assert out.shape == (3, 224, 224)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: far below the 10 GB


# -- the route, in-process with a fake backend ---------------------------------------------------------
async def test_top_k_predictions_in_order_with_labels_and_the_model(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, classify_manifest(num_classes=5))
    backend = FakeBackend(fixed_logits(5))
    async with running_app(create_app(Settings(models=[folder]), lambda *_: backend)) as client:
        response = await client.post("/classify?top_k=3", content=JPEG, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    body = response.json()
    predictions = body["results"][0]["predictions"]
    assert [p["class_id"] for p in predictions] == [0, 1, 2]
    assert [p["label"] for p in predictions] == ["label_0", "label_1", "label_2"]
    expected = softmax(-np.arange(5, dtype=np.float64))
    assert [p["score"] for p in predictions] == pytest.approx(expected[:3].tolist())
    assert body["model"]["name"] == "focal_tiny"
    assert (body["model"]["weights"], body["model"]["random_init"]) == ("random-init", True)
    assert response.headers["x-request-id"]


async def test_several_images_keep_their_order_and_top_k_is_bounded(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, classify_manifest(num_classes=5))

    def by_brightness(batch: np.ndarray) -> np.ndarray:  # the brighter the image, the higher class 4
        logits = np.zeros((len(batch), 5), np.float32)
        logits[:, 4] = batch.mean(axis=(1, 2, 3)) * 10
        return logits

    images = [encode(Image.new("RGB", (40, 30), (v, v, v)), "PNG") for v in (250, 0, 128)]
    async with running_app(create_app(Settings(models=[folder]), lambda *_: FakeBackend(by_brightness))) as client:
        files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        response = await client.post("/classify?top_k=1", files=files)
        assert response.status_code == 200, response.text
        top = [r["predictions"][0] for r in response.json()["results"]]
        assert [p["class_id"] for p in top] == [4, 0, 4]
        assert top[0]["score"] > top[2]["score"]
        too_many = await client.post("/classify?top_k=6", content=JPEG, headers={"Content-Type": "image/jpeg"})
    assert too_many.status_code == 422
    assert "at most the number of classes (5)" in too_many.json()["error"]["message"]


# -- the numbers, end to end on a real export ------------------------------------------------------------
IMAGES = {
    "jpeg": (JPEG, "image/jpeg"),
    "png": (encode(photo(seed=2), "PNG"), "image/png"),
    "webp": (encode(photo(seed=3), "WEBP"), "image/webp"),
    "grayscale": (encode(photo(seed=4).convert("L"), "PNG"), "image/png"),
    "rgba": (encode(photo(seed=5).convert("RGBA"), "PNG"), "image/png"),
    "cmyk": (encode(photo(seed=6).convert("CMYK"), "JPEG"), "image/jpeg"),
    "exif-rotated": (exif_rotated_jpeg(photo(seed=7)), "image/jpeg"),
    "large (JPEG draft)": (encode(photo((1920, 1080), seed=9), "JPEG", quality=92), "image/jpeg"),
}


def _reference(export: ClassifyExport, blobs: list[bytes]) -> np.ndarray:
    """Softmax probabilities from a direct onnxruntime run on the same preprocessed tensors."""
    spec = CenterCrop.from_manifest(export.manifest.preprocess)
    batch = np.stack([spec.to_canvas(decode(b, 10**8, spec.draft_short_side)).pixels for b in blobs])
    session = ort.InferenceSession(str(export.folder / export.manifest.onnx_fp32), providers=["CPUExecutionProvider"])
    return softmax(session.run(None, {"pixels": batch})[0].astype(np.float64))


async def test_every_format_gets_the_numbers_of_a_direct_onnxruntime_run(classify_export: ClassifyExport) -> None:
    app = create_app(Settings(models=[classify_export.folder], max_batch_size=4, max_queue_delay_ms=20))
    async with running_app(app) as client:
        responses = {
            kind: await client.post("/classify?top_k=3", content=data, headers={"Content-Type": content_type})
            for kind, (data, content_type) in IMAGES.items()
        }
        files = [("image", (f"{k}.img", data, "application/octet-stream")) for k, (data, _) in IMAGES.items()]
        together = await client.post("/classify?top_k=3", files=files)
        models = (await client.get("/v1/models")).json()["models"]
    labels = (classify_export.folder / "labels.txt").read_text().splitlines()
    expected = _reference(classify_export, [data for data, _ in IMAGES.values()])
    results: list[dict[str, Any]] = [responses[kind].json()["results"][0] for kind in IMAGES]
    assert together.status_code == 200
    batched = together.json()["results"]  # batched or not, in request order
    for one, other in zip(batched, results, strict=True):
        assert [p["class_id"] for p in one["predictions"]] == [p["class_id"] for p in other["predictions"]]
        assert [p["score"] for p in one["predictions"]] == pytest.approx([p["score"] for p in other["predictions"]])
    for result, probs in zip(results, expected, strict=True):
        top = np.argsort(-probs, kind="stable")[:3]
        assert [p["class_id"] for p in result["predictions"]] == top.tolist()
        assert [p["label"] for p in result["predictions"]] == [labels[i] for i in top]
        assert [p["score"] for p in result["predictions"]] == pytest.approx(probs[top].tolist(), rel=1e-4)
    # An fp16 export runs its fp32 graph on a CPU (fp16 there is slower), and says so.
    assert classify_export.manifest.precision == "fp16"
    assert (models[0]["backend"], models[0]["device"], models[0]["precision"]) == ("onnxruntime", "cpu", "fp32")


async def test_the_server_refuses_what_the_model_cannot_be_asked(classify_export: ClassifyExport) -> None:
    async with running_app(create_app(Settings(models=[classify_export.folder]))) as client:
        detect = await client.post("/detect", content=JPEG, headers={"Content-Type": "image/jpeg"})
    assert detect.status_code == 404
    assert "no detect model is loaded" in detect.json()["error"]["message"]
