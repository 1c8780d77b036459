"""The real service: `python -m service` in a subprocess over a real export, called over HTTP and gRPC.
One smoke test per task, one of the Open Inference Protocol through NVIDIA's own clients (tritonclient,
HTTP and gRPC) against this service's own API, and the SIGTERM-under-load test; everything else is
tested in-process."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient

from service.images import decode_with_size
from service.launch import free_port, running_server
from service.tasks.classify import CenterCrop
from service.tasks.detect import Letterbox
from tests.conftest import HORSE, ClassifyExport, DetectExport
from tests.support import encode, photo

LARGE_JPEG = encode(photo((1280, 960), seed=3), "JPEG", quality=90)


def test_classify_smoke(classify_export: ClassifyExport) -> None:
    with running_server(classify_export.folder) as server:
        response = httpx.post(
            f"{server.url}/classify?top_k=2", content=LARGE_JPEG, headers={"Content-Type": "image/jpeg"}, timeout=30
        )
        models = httpx.get(f"{server.url}/v1/models").json()["models"]
        logs = server.logs()
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["predictions"]) == 2
    assert response.json()["model"]["random_init"] is True
    assert [(m["task"], m["backend"], m["ready"]) for m in models] == [("classify", "onnxruntime", True)]
    assert "RANDOM-INIT" in logs
    assert '"request_id"' in logs  # JSON log lines carry the request id


def test_two_front_ends_feed_one_model_host_and_report_one_set_of_metrics(classify_export: ClassifyExport) -> None:
    """FOCAL_WORKERS=2: requests on separate connections, their images batched in the model host, and
    /metrics, whichever process answers it, adding up every process's counters. (Which front end accepts
    a connection is the kernel's choice, so batches mixing both are shown in test_workers.py.)"""
    settings = {"workers": "2", "max_batch_size": "8", "max_queue_delay_ms": "300", "intra_op_threads": "1"}
    with running_server(classify_export.folder, **settings) as server:

        async def one() -> int:
            async with httpx.AsyncClient(timeout=60) as client:  # a connection of its own
                response = await client.post(
                    f"{server.url}/classify", content=LARGE_JPEG, headers={"Content-Type": "image/jpeg"}
                )
                return response.status_code

        async def burst() -> list[int]:
            return list(await asyncio.gather(*(one() for _ in range(16))))

        assert asyncio.run(burst()) == [200] * 16
        metrics = httpx.get(f"{server.url}/metrics").text
        models = httpx.get(f"{server.url}/v1/models").json()["models"]
        assert "RANDOM-INIT" in server.logs()

    def value(name: str, labels: str = 'model="focal_tiny"') -> float:
        found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", metrics, re.MULTILINE)
        assert found, name
        return float(found.group(1))

    assert value("focal_requests_total", 'code="200",endpoint="/classify",protocol="http"') == 16
    assert value("focal_batch_images_total") == 16
    batches = value("focal_batch_front_ends_count")
    assert batches < 16  # batches formed
    assert value("focal_batch_front_ends_sum") >= batches
    assert models[0]["random_init"] is True


def test_detect_smoke(detect_export: DetectExport) -> None:
    with running_server(detect_export.folder) as server:
        response = httpx.post(
            f"{server.url}/detect?score_threshold=0.5&max_detections=3",
            content=LARGE_JPEG,
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["image_size"] == [1280, 960]
    assert [d["class_id"] for d in result["detections"]] == [HORSE] * 3


def _in_progress(url: str, protocol: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(rf'^focal_requests_in_progress\{{protocol="{protocol}"\}} (\S+)', text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def _bytes_input(module: Any, images: list[bytes]) -> Any:
    given = module.InferInput("image_bytes", [len(images)], "BYTES")
    given.set_data_from_numpy(np.array(images, dtype=np.object_))
    return given


def _pixels_input(module: Any, pixels: np.ndarray, **json_or_binary: bool) -> Any:
    given = module.InferInput("pixels", list(pixels.shape), {"uint8": "UINT8"}.get(pixels.dtype.name, "FP32"))
    given.set_data_from_numpy(pixels, **json_or_binary)
    return given


def test_open_inference_protocol_clients_match_the_own_api(
    classify_export: ClassifyExport, detect_export: DetectExport
) -> None:
    """tritonclient.http and tritonclient.grpc, unchanged, against one server with both exports: metadata,
    readiness, and inference with the model input as a tensor (the classifier's UINT8 pixels, the
    detector's FP32 canvas; JSON and binary) and with encoded images, equal to what /classify and /detect
    answer for the same images."""
    grpc_port = free_port()
    second = encode(photo((500, 700), seed=9), "JPEG", quality=90)
    models = f"{classify_export.folder},{detect_export.folder}"
    with running_server(models, grpc_port=str(grpc_port)) as server:
        http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        clients = [(httpclient, http), (grpcclient, grpc)]
        for _, client in clients:
            assert client.is_server_live()
            assert client.is_server_ready()
            assert client.is_model_ready("focal_tiny")
            assert client.is_model_ready("focal_tiny_retinanet", "1")
        metadata = http.get_model_metadata("focal_tiny")
        assert metadata["platform"] == "onnxruntime_onnx"
        assert [(o["name"], o["shape"]) for o in metadata["outputs"]] == [
            ("logits", [-1, 10]),
            ("probabilities", [-1, 10]),
        ]
        assert grpc.get_model_metadata("focal_tiny", as_json=True)["outputs"][0]["shape"] == ["-1", "10"]
        assert metadata["inputs"][0] == {"name": "pixels", "datatype": "UINT8", "shape": [-1, 3, 224, 224]}
        detector_input = http.get_model_metadata("focal_tiny_retinanet")["inputs"][0]
        assert detector_input["datatype"] == "FP32"  # detection exports keep float input (the letterbox pad)

        # The classifier: probabilities from JPEG bytes equal /classify's scores; logits from the UINT8 tensor
        # (the service's own decoding and transform, done here) equal logits from the bytes.
        own = [
            httpx.post(f"{server.url}/classify?top_k=10", content=jpeg, headers={"Content-Type": "image/jpeg"}).json()[
                "results"
            ][0]["predictions"]
            for jpeg in (LARGE_JPEG, second)
        ]
        expected = np.array([[p["score"] for p in sorted(preds, key=lambda p: p["class_id"])] for preds in own])
        crop = CenterCrop.from_manifest(classify_export.manifest.preprocess)
        decoded = [decode_with_size(jpeg, 10**8, crop.draft_short_side) for jpeg in (LARGE_JPEG, second)]
        pixels = np.stack([crop.to_canvas(image, size).pixels for image, size in decoded])
        for module, client in clients:
            from_bytes = client.infer("focal_tiny", [_bytes_input(module, [LARGE_JPEG, second])], request_id="r1")
            assert from_bytes.get_response(**({"as_json": True} if module is grpcclient else {}))["id"] == "r1"
            assert np.abs(from_bytes.as_numpy("probabilities") - expected).max() < 1e-5
            forms = [{"binary_data": True}, {"binary_data": False}] if module is httpclient else [{}]
            for form in forms:
                from_pixels = client.infer("focal_tiny", [_pixels_input(module, pixels, **form)])
                assert np.abs(from_pixels.as_numpy("logits") - from_bytes.as_numpy("logits")).max() < 1e-5

        # The detector: the same detections as /detect, in original-image pixels.
        found = httpx.post(f"{server.url}/detect", content=LARGE_JPEG, headers={"Content-Type": "image/jpeg"})
        detections = found.json()["results"][0]["detections"]
        own_rows = np.array([[*d["box"], d["score"], d["class_id"]] for d in detections])
        assert len(own_rows) > 0
        for module, client in clients:
            result = client.infer("focal_tiny_retinanet", [_bytes_input(module, [LARGE_JPEG])])
            count = int(result.as_numpy("num_detections")[0])
            rows = result.as_numpy("detections")[0]
            assert count == len(own_rows)
            assert np.array_equal(rows[:count, 5], own_rows[:, 5])
            assert np.abs(rows[:count, :5] - own_rows[:, :5]).max() < 1e-3  # float32 pixels of a 1280x960 image
            assert not rows[count:].any()

        # The detector's canvas as an FP32 tensor (the service's own letterbox, done here): the same
        # detections in canvas pixels. A square image fills the canvas, so both clip boxes alike.
        square = encode(photo((640, 640), seed=5), "JPEG", quality=90)
        letterbox = Letterbox.from_manifest(detect_export.manifest)
        image, size = decode_with_size(square, 10**8, letterbox.draft_short_side)
        placed = letterbox.to_canvas(image, size)
        scale = placed.scale[0]
        for module, client in clients:
            forms = [{"binary_data": True}, {"binary_data": False}] if module is httpclient else [{}]
            from_bytes = client.infer("focal_tiny_retinanet", [_bytes_input(module, [square])])
            count = int(from_bytes.as_numpy("num_detections")[0])
            assert count > 0
            for form in forms:
                canvas = client.infer("focal_tiny_retinanet", [_pixels_input(module, placed.pixels[None], **form)])
                assert int(canvas.as_numpy("num_detections")[0]) == count
                rows, image_rows = canvas.as_numpy("detections")[0], from_bytes.as_numpy("detections")[0]
                assert np.array_equal(rows[:count, 4:], image_rows[:count, 4:])
                assert np.abs(rows[:count, :4] / scale - image_rows[:count, :4]).max() < 1e-2
        http.close()
        grpc.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_finishes_queued_work_refuses_new_and_exits_0(classify_export: ClassifyExport, workers: str) -> None:
    """HTTP and gRPC (Open Inference Protocol) requests queued or running at SIGTERM all succeed; new
    ones are refused; the process exits 0. With two front-end processes and the model host, each of
    them exits 0 too (the supervisor logs every exit code and exits 0 only if all were 0)."""
    grpc_port = free_port()
    settings = {"max_batch_size": "2", "max_queue_delay_ms": "0", "intra_op_threads": "1", "preprocess_threads": "1"}
    settings["workers"] = workers
    with running_server(classify_export.folder, grpc_port=str(grpc_port), **settings) as server:

        async def scenario() -> tuple[list[Any], list[Any], int, str]:
            finished: list[float] = []
            grpc_finished: list[float] = []  # one answered: the channel is up and every gRPC call was sent

            async def one(client: httpx.AsyncClient) -> httpx.Response:
                response = await client.post(
                    f"{server.url}/classify", content=LARGE_JPEG, headers={"Content-Type": "image/jpeg"}
                )
                finished.append(time.monotonic())
                return response

            async def one_grpc(client: grpc_aio.InferenceServerClient) -> Any:
                result = await client.infer("focal_tiny", [_bytes_input(grpc_aio, [LARGE_JPEG])])
                finished.append(time.monotonic())
                grpc_finished.append(time.monotonic())
                return result

            grpc_client = grpc_aio.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.ensure_future(one(client)) for _ in range(32)]
                grpc_tasks = [asyncio.ensure_future(one_grpc(grpc_client)) for _ in range(8)]
                # Every gRPC call received (running, or answered) and an answer back: the rest is queued or running.
                while not finished or _in_progress(server.url, "v2-grpc") + len(grpc_finished) < 8:
                    await asyncio.sleep(0.005)
                server.process.send_signal(signal.SIGTERM)
                pending = 40 - len(finished)
                await asyncio.sleep(0.3)
                try:
                    async with httpx.AsyncClient(timeout=5) as fresh:
                        late = await fresh.post(
                            f"{server.url}/classify", content=LARGE_JPEG, headers={"Content-Type": "image/jpeg"}
                        )
                    late_outcome = str(late.status_code)
                except httpx.TransportError:
                    late_outcome = "refused"
                answers = list(await asyncio.gather(*tasks, return_exceptions=True))
                grpc_answers = list(await asyncio.gather(*grpc_tasks, return_exceptions=True))
            await grpc_client.close()
            return answers, grpc_answers, pending, late_outcome

        results, grpc_results, pending, late_outcome = asyncio.run(scenario())
        assert [r.status_code for r in results if isinstance(r, httpx.Response)] == [200] * 32, results
        assert [str(r) for r in grpc_results if isinstance(r, BaseException)] == []
        assert all(r.as_numpy("logits").shape == (1, 10) for r in grpc_results)
        assert pending >= 5  # this much work was still queued or running when the signal came
        assert late_outcome in ("refused", "503")
        assert server.process.wait(timeout=60) == 0
        assert "shutdown requested" in server.logs()
        if workers == "2":
            exits = re.findall(r"(front end|model host) \d+ exited with (-?\d+|None)", server.logs())
            assert sorted(exits) == [("front end", "0"), ("front end", "0"), ("model host", "0")], server.logs()
