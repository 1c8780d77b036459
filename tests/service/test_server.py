"""The real service: `python -m service` in a subprocess over a real export, called over HTTP. One smoke
test per task, and the SIGTERM-under-load test; everything else is tested in-process."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx

from service.launch import running_server
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


def test_sigterm_finishes_queued_work_refuses_new_and_exits_0(classify_export: ClassifyExport) -> None:
    settings = {"max_batch_size": "2", "max_queue_delay_ms": "0", "intra_op_threads": "1", "preprocess_threads": "1"}
    with running_server(classify_export.folder, **settings) as server:

        async def scenario() -> tuple[list[Any], int, str]:
            finished: list[float] = []

            async def one(client: httpx.AsyncClient) -> httpx.Response:
                response = await client.post(
                    f"{server.url}/classify", content=LARGE_JPEG, headers={"Content-Type": "image/jpeg"}
                )
                finished.append(time.monotonic())
                return response

            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.ensure_future(one(client)) for _ in range(32)]
                while not finished:  # the first answers came back: the rest is queued or running
                    await asyncio.sleep(0.005)
                server.process.send_signal(signal.SIGTERM)
                pending = 32 - len(finished)
                await asyncio.sleep(0.3)
                try:
                    async with httpx.AsyncClient(timeout=5) as fresh:
                        late = await fresh.post(
                            f"{server.url}/classify", content=LARGE_JPEG, headers={"Content-Type": "image/jpeg"}
                        )
                    late_outcome = str(late.status_code)
                except httpx.TransportError:
                    late_outcome = "refused"
                return list(await asyncio.gather(*tasks, return_exceptions=True)), pending, late_outcome

        results, pending, late_outcome = asyncio.run(scenario())
        assert [r.status_code for r in results if isinstance(r, httpx.Response)] == [200] * 32, results
        assert pending >= 5  # this much work was still queued or running when the signal came
        assert late_outcome in ("refused", "503")
        assert server.process.wait(timeout=60) == 0
        assert "shutdown requested" in server.logs()
