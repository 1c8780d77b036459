"""The real service: `python -m service` in a subprocess serving a real export on onnxruntime CPU,
called over HTTP with httpx."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.images import Preprocess, decode, preprocess
from service.launch import Server, running_server
from tests.images import encode, exif_rotated_jpeg, photo

Export = tuple[Path, dict[str, Any], str]


@pytest.fixture(scope="module")
def server(tiny_export: Export) -> Iterator[Server]:
    with running_server(tiny_export[0], max_batch_size="8", max_queue_delay_ms="20") as srv:
        yield srv


def _reference(export: Export, blobs: list[bytes]) -> np.ndarray:
    """Softmax probabilities from a direct onnxruntime run on the same preprocessed tensors."""
    folder, manifest, _ = export
    spec = Preprocess.from_manifest(manifest["preprocess"])
    batch = np.stack([preprocess(decode(b, 10**8), spec) for b in blobs])
    session = ort.InferenceSession(str(folder / manifest["onnx_fp32"]), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"pixels": batch})[0].astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def _check_against_reference(body: dict[str, Any], probs: np.ndarray, labels: list[str]) -> None:
    assert len(body["results"]) == len(probs)
    for result, expected in zip(body["results"], probs, strict=True):
        top = np.argsort(-expected, kind="stable")[: len(result["predictions"])]
        for prediction, class_id in zip(result["predictions"], top, strict=True):
            assert prediction["class_id"] == class_id
            assert prediction["label"] == labels[class_id]
            assert prediction["score"] == pytest.approx(expected[class_id], rel=1e-4)


IMAGES = {
    "jpeg": encode(photo(seed=1), "JPEG", quality=90),
    "png": encode(photo(seed=2), "PNG"),
    "webp": encode(photo(seed=3), "WEBP"),
    "grayscale": encode(photo(seed=4).convert("L"), "PNG"),
    "rgba": encode(photo(seed=5).convert("RGBA"), "PNG"),
    "cmyk": encode(photo(seed=6).convert("CMYK"), "JPEG"),
    "exif-rotated": exif_rotated_jpeg(photo(seed=7)),
}


@pytest.mark.parametrize("kind", list(IMAGES))
def test_classify_raw_body(kind: str, server: Server, tiny_export: Export) -> None:
    data = IMAGES[kind]
    content_type = {"png": "image/png", "webp": "image/webp", "grayscale": "image/png", "rgba": "image/png"}
    response = httpx.post(
        f"{server.url}/classify?top_k=3",
        content=data,
        headers={"Content-Type": content_type.get(kind, "image/jpeg")},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["random_init"] is True
    assert body["model"]["weights"] == "random-init"
    labels = (tiny_export[0] / "labels.txt").read_text().splitlines()
    _check_against_reference(body, _reference(tiny_export, [data]), labels)
    assert response.headers["x-request-id"]


def test_classify_multipart_with_several_images_keeps_their_order(server: Server, tiny_export: Export) -> None:
    blobs = [IMAGES["jpeg"], IMAGES["png"], IMAGES["exif-rotated"]]
    files = [("image", (f"{i}.img", b, "application/octet-stream")) for i, b in enumerate(blobs)]
    response = httpx.post(f"{server.url}/classify", files=files, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [len(r["predictions"]) for r in body["results"]] == [5, 5, 5]
    labels = (tiny_export[0] / "labels.txt").read_text().splitlines()
    _check_against_reference(body, _reference(tiny_export, blobs), labels)
    assert all(p["label"] in labels for r in body["results"] for p in r["predictions"])


def _post_concurrently(url: str, count: int, timeout_s: float = 60) -> list[Any]:
    """`count` simultaneous JPEG classify requests; responses (or the client's exceptions) in order."""

    async def scenario() -> list[Any]:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            requests = (
                client.post(f"{url}/classify", content=IMAGES["jpeg"], headers={"Content-Type": "image/jpeg"})
                for _ in range(count)
            )
            return list(await asyncio.gather(*requests, return_exceptions=True))

    return asyncio.run(scenario())


def test_32_concurrent_requests_are_batched(server: Server) -> None:
    before = _batch_histogram(server)
    responses = _post_concurrently(server.url, 32)
    assert [r.status_code for r in responses] == [200] * 32
    first = responses[0].json()["results"]
    assert all(r.json()["results"] == first for r in responses)
    after = _batch_histogram(server)
    images = after["sum"] - before["sum"]
    batches = after["count"] - before["count"]
    assert images == 32
    assert batches < 32  # some batches held more than one image
    assert after["le_1"] - before["le_1"] < batches


def _batch_histogram(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text

    def value(pattern: str) -> float:
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    return {
        "sum": value(r"^focal_batch_size_sum\{[^}]*\} (\S+)"),
        "count": value(r"^focal_batch_size_count\{[^}]*\} (\S+)"),
        "le_1": value(r'^focal_batch_size_bucket\{le="1.0"[^}]*\} (\S+)'),
    }


def _png_bomb() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _raw(data: bytes, content_type: str | None = "image/jpeg", **params: Any) -> dict[str, Any]:
    headers = {"Content-Type": content_type} if content_type else {}
    return {"content": data, "headers": headers, "params": params}


def _parts(name: str, count: int) -> dict[str, Any]:
    return {"files": [(name, ("a.jpg", IMAGES["jpeg"], "image/jpeg"))] * count}


JPEG = IMAGES["jpeg"]
BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("empty body", _raw(b""), 400, "bad_image"),
    ("random bytes", _raw(bytes(range(256)) * 8, "image/png"), 400, "bad_image"),
    ("truncated jpeg", _raw(JPEG[:500]), 400, "bad_image"),
    ("png bomb", _raw(_png_bomb(), "image/png"), 413, "payload_too_large"),
    ("wrong content type", _raw(b"{}", "application/json"), 415, "unsupported_media_type"),
    ("no content type", _raw(JPEG, None), 415, "unsupported_media_type"),
    ("top_k 0", _raw(JPEG, top_k=0), 422, "invalid_parameter"),
    ("top_k 10^6", _raw(JPEG, top_k=10**6), 422, "invalid_parameter"),
    ("top_k text", _raw(JPEG, top_k="many"), 422, "invalid_parameter"),
    ("too many images", _parts("image", 33), 413, "payload_too_large"),
    ("multipart without image", _parts("picture", 1), 400, "bad_image"),
    ("body over 20 MB", _raw(b"\xff" * (21 * 1024 * 1024)), 413, "payload_too_large"),
]


@pytest.mark.parametrize(("case", "request_kwargs", "status", "code"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_its_error_and_the_server_carries_on(
    case: str, request_kwargs: dict[str, Any], status: int, code: str, server: Server
) -> None:
    response = httpx.post(f"{server.url}/classify", timeout=60, **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    ok = httpx.post(f"{server.url}/classify", content=IMAGES["png"], headers={"Content-Type": "image/png"}, timeout=30)
    assert ok.status_code == 200


def test_chunked_body_over_the_limit_is_refused_while_reading(server: Server) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for _ in range(22):
            yield b"\xff" * (1024 * 1024)

    response = httpx.post(
        f"{server.url}/classify", content=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_extreme_aspect_ratio_is_served(server: Server) -> None:
    strip = encode(Image.new("RGB", (1, 40000), (30, 90, 200)), "PNG")
    response = httpx.post(f"{server.url}/classify", content=strip, headers={"Content-Type": "image/png"}, timeout=60)
    assert response.status_code == 200


def test_large_photo_through_jpeg_draft_matches_the_reference_closely(server: Server, tiny_export: Export) -> None:
    """A 1920x1080 JPEG is decoded at reduced scale (draft); the top prediction still agrees with full decode."""
    data = encode(photo((1920, 1080), seed=9), "JPEG", quality=92)
    response = httpx.post(f"{server.url}/classify?top_k=1", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200
    probs = _reference(tiny_export, [data])[0]
    assert response.json()["results"][0]["predictions"][0]["score"] == pytest.approx(probs.max(), rel=0.05)


def test_fp16_export_reports_the_precision_that_runs_on_the_cpu(server: Server, tiny_export: Export) -> None:
    assert tiny_export[1]["precision"] == "fp16"
    model = httpx.get(f"{server.url}/v1/models").json()["models"][0]
    assert (model["device"], model["precision"]) == ("cpu", "fp32")  # the fp32 graph: fp16 on a CPU is slower


def test_probes_models_metrics_and_docs(server: Server) -> None:
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(server.url + path).json()["status"] == "ok"
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    assert len(models) == 1
    assert models[0] | {"warmup_seconds": None} == models[0] | {
        "variant": "focal_tiny",
        "task": "classify",
        "backend": "onnxruntime",
        "device": "cpu",
        "weights": "random-init",
        "random_init": True,
        "ready": True,
        "max_batch_size": 8,
        "warmup_seconds": None,
    }
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("focal_requests_total", "focal_request_duration_seconds_bucket", "focal_queue_wait_seconds_bucket",
                 "focal_batch_inference_seconds_bucket", "focal_batch_size_bucket", "focal_queue_depth",
                 "focal_batch_images_total", "focal_model_info"):  # fmt: skip
        assert name in metrics
    assert 'weights="random-init"' in metrics
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "ClassifyResponse" in schema["components"]["schemas"]
    assert "multipart/form-data" in schema["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_detect_without_a_detection_model_is_404(server: Server) -> None:
    response = httpx.post(f"{server.url}/detect", content=IMAGES["jpeg"], headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 404
    assert "no detect model is loaded" in response.json()["error"]["message"]


def test_overload_is_refused_promptly_with_retry_after(tiny_export: Export) -> None:
    with running_server(tiny_export[0], max_batch_size="1", max_queue_size="2", max_queue_delay_ms="0") as srv:
        start = time.monotonic()
        responses = _post_concurrently(srv.url, 24)
        elapsed = time.monotonic() - start
        codes = [r.status_code for r in responses]
        refused = [r for r in responses if r.status_code == 429]
        assert refused, codes
        assert set(codes) <= {200, 429}
        assert all(r.headers["retry-after"] == "1" for r in refused)
        assert all(r.json()["error"]["code"] == "overloaded" for r in refused)
        assert elapsed < 30  # nothing hung


def test_images_of_clients_that_went_away_are_dropped_before_running(tiny_export: Export) -> None:
    with running_server(tiny_export[0], max_batch_size="1", max_queue_delay_ms="0") as srv:
        _post_concurrently(srv.url, 12, timeout_s=0.3)  # they give up while queued
        time.sleep(1.5)  # let the batcher reach the abandoned images
        metrics = httpx.get(f"{srv.url}/metrics").text
        dropped = re.search(r'^focal_dropped_images_total\{[^}]*reason="cancelled"\} (\S+)', metrics, re.MULTILINE)
        images = re.search(r"^focal_batch_images_total\{[^}]*\} (\S+)", metrics, re.MULTILINE)
        assert dropped
        assert float(dropped.group(1)) >= 1
        assert images
        assert float(images.group(1)) < 12 + 3


def test_sigterm_finishes_queued_work_refuses_new_and_exits_0(tiny_export: Export) -> None:
    with running_server(tiny_export[0], max_batch_size="2", max_queue_delay_ms="0") as srv:

        async def scenario() -> tuple[list[Any], list[float], float, str]:
            finished: list[float] = []

            async def one(client: httpx.AsyncClient) -> httpx.Response:
                response = await client.post(
                    f"{srv.url}/classify", content=IMAGES["jpeg"], headers={"Content-Type": "image/jpeg"}
                )
                finished.append(time.monotonic())
                return response

            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.ensure_future(one(client)) for _ in range(24)]  # ~1.5 s of work at 2 cores
                while not finished:  # the first answers came back: the rest is queued or running
                    await asyncio.sleep(0.01)
                srv.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.3)
                try:
                    async with httpx.AsyncClient(timeout=5) as fresh:
                        late = await fresh.post(
                            f"{srv.url}/classify", content=IMAGES["jpeg"], headers={"Content-Type": "image/jpeg"}
                        )
                    late_outcome = str(late.status_code)
                except httpx.TransportError:
                    late_outcome = "refused"
                return list(await asyncio.gather(*tasks, return_exceptions=True)), finished, signalled, late_outcome

        results, finished, signalled, late_outcome = asyncio.run(scenario())
        assert [r.status_code for r in results if isinstance(r, httpx.Response)] == [200] * 24, results
        assert sum(t > signalled for t in finished) >= 5  # queued work finished after the signal
        assert late_outcome in ("refused", "503")
        assert srv.process.wait(timeout=60) == 0
        assert "shutdown requested" in srv.logs()
