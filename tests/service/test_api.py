"""The HTTP behaviour every task shares, in-process (`create_app` + a fake backend + httpx's ASGI
transport): errors and their bodies, limits, admission, deadlines, disconnects, drain, the health
state machine as the probes show it, metrics, and an OpenAPI document that declares every status."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from manifest import FORMAT_VERSION, MANIFEST_NAME
from service import errors
from service.app import create_app
from service.batcher import DynamicBatcher
from service.models import ModelLoadError
from service.settings import Settings
from tests.support import (
    JPEG,
    FakeBackend,
    classify_manifest,
    detect_manifest,
    encode,
    fixed_logits,
    model_folder,
    photo,
    running_app,
    until,
    wait_ready,
)

pytestmark = pytest.mark.anyio
PNG = encode(photo(seed=2), "PNG")


def batcher_of(app: FastAPI) -> DynamicBatcher:
    batcher: DynamicBatcher = app.state.service.models["focal_tiny"].batcher
    return batcher


def classifier(tmp_path: Path, **settings: Any) -> tuple[FastAPI, FakeBackend]:
    folder = model_folder(tmp_path / "classifier", classify_manifest(num_classes=5))
    backend = FakeBackend(fixed_logits(5))
    return create_app(Settings(models=[folder], **settings), lambda *_: backend), backend


def _declared(app: FastAPI, method: str, path: str) -> set[int]:
    return {int(code) for code in app.openapi()["paths"][path][method.lower()]["responses"]}


def assert_error(app: FastAPI, response: httpx.Response, status: int, code: str) -> None:
    """An error answer: its status, the one JSON body shape, the request id, and declared in OpenAPI."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], bool(error["message"])) == (code, True)
    assert error["request_id"] == response.headers["x-request-id"]
    assert status in _declared(app, response.request.method, response.request.url.path)


def _png_bomb() -> bytes:
    return encode(Image.new("1", (30000, 30000)), "PNG")


def _raw(data: bytes, content_type: str | None = "image/jpeg", **params: Any) -> dict[str, Any]:
    return {"content": data, "headers": {"Content-Type": content_type} if content_type else {}, "params": params}


def _parts(name: str, count: int) -> dict[str, Any]:
    return {"files": [(name, ("a.jpg", JPEG, "image/jpeg"))] * count}


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("empty body", _raw(b""), 400, "bad_image"),
    ("random bytes", _raw(bytes(range(256)) * 8, "image/png"), 400, "bad_image"),
    ("truncated jpeg", _raw(JPEG[:500]), 400, "bad_image"),
    ("png bomb", _raw(_png_bomb(), "image/png"), 413, "payload_too_large"),
    ("wrong content type", _raw(b"{}", "application/json"), 415, "unsupported_media_type"),
    ("no content type", _raw(JPEG, None), 415, "unsupported_media_type"),
    ("too many images", _parts("image", 33), 413, "payload_too_large"),
    ("multipart without image", _parts("picture", 1), 400, "bad_image"),
    ("one bad image of two", {"files": [("image", ("a.jpg", JPEG, "image/jpeg")), ("image", ("b", b"x", "x/y"))]},
     400, "bad_image"),
    ("body over 20 MB", _raw(b"\xff" * (21 * 1024 * 1024)), 413, "payload_too_large"),
]  # fmt: skip
CLASSIFY_BAD = [
    *BAD_REQUESTS,
    ("top_k 0", _raw(JPEG, top_k=0), 422, "invalid_parameter"),
    ("top_k 10^6", _raw(JPEG, top_k=10**6), 422, "invalid_parameter"),
    ("top_k text", _raw(JPEG, top_k="many"), 422, "invalid_parameter"),
]
DETECT_BAD = [
    *BAD_REQUESTS,
    ("max_detections 0", _raw(JPEG, max_detections=0), 422, "invalid_parameter"),
    ("max_detections 6", _raw(JPEG, max_detections=6), 422, "invalid_parameter"),
    ("score_threshold 2", _raw(JPEG, score_threshold=2), 422, "invalid_parameter"),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def both(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """One app serving a classifier and a detector (fake backends) for the error cases."""
    root = tmp_path_factory.mktemp("both")
    folders = [model_folder(root / "c", classify_manifest(num_classes=5)), model_folder(root / "d", detect_manifest())]
    backends = {
        "classify": FakeBackend(fixed_logits(5)),
        "detect": FakeBackend(lambda b: np.zeros((len(b), 20, 6), np.float32)),
    }
    app = create_app(Settings(models=folders), lambda checked, _: backends[checked.manifest.task])
    async with running_app(app) as client:
        yield app, client


BAD_BY_ROUTE = [("/classify", *c) for c in CLASSIFY_BAD] + [("/detect", *c) for c in DETECT_BAD]


@pytest.mark.parametrize(
    ("path", "case", "request_kwargs", "status", "code"), BAD_BY_ROUTE, ids=[f"{c[0]} {c[1]}" for c in BAD_BY_ROUTE]
)
async def test_a_bad_request_gets_its_error_and_the_server_carries_on(
    path: str,
    case: str,
    request_kwargs: dict[str, Any],
    status: int,
    code: str,
    both: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = both
    assert_error(app, await client.post(path, **request_kwargs), status, code)
    assert (await client.post(path, content=PNG, headers={"Content-Type": "image/png"})).status_code == 200


async def test_a_body_streamed_past_the_limit_is_refused_while_reading(both: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, client = both

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for _ in range(22):
            yield b"\xff" * (1024 * 1024)

    response = await client.post("/classify", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert_error(app, response, 413, "payload_too_large")


async def test_request_ids_are_honoured_and_unknown_routes_answer_json(both: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, client = both
    response = await client.post("/classify", content=PNG, headers={"Content-Type": "image/png", "X-Request-ID": "r-1"})
    assert response.headers["x-request-id"] == "r-1"
    missing = await client.get("/nowhere")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    wrong = await client.get("/classify")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")
    # A GET with a large declared body is not refused: no GET route reads a body.
    assert await client.request("GET", "/healthz", content=b"x" * 100, headers={"Content-Length": str(10**9)})


def test_every_route_declares_every_status_it_can_answer(tmp_path: Path) -> None:
    """The image routes (and v2 inference) can answer every error the service defines (`service.errors`)
    but the model repository's (401, 403, and 501 with several front-end processes); every route can
    answer 500 should a bug surface. (499, for a client that is gone, is logged and reaches nobody.)"""
    app, _ = classifier(tmp_path)
    defined = {
        cls.status for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.ServiceError)
    }
    image_statuses = {200} | defined - {401, 403, 501}
    assert image_statuses == {200, 400, 404, 413, 415, 422, 429, 500, 503, 504}
    assert _declared(app, "POST", "/classify") == image_statuses
    assert _declared(app, "POST", "/detect") == image_statuses
    assert _declared(app, "POST", "/v2/models/{name}/infer") == image_statuses
    assert _declared(app, "POST", "/v2/repository/models/{name}/load") == {200, 400, 401, 403, 404, 422, 500, 501, 503}
    assert _declared(app, "GET", "/healthz") == _declared(app, "GET", "/readyz") == {200, 500, 503}
    assert _declared(app, "GET", "/v1/models") == _declared(app, "GET", "/metrics") == {200, 500}
    schema = app.openapi()
    for path in ("/classify", "/detect"):
        responses = schema["paths"][path]["post"]["responses"]
        for status in image_statuses - {200}:  # every error with the error body, not FastAPI's default
            assert responses[str(status)]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"
            }
        assert "multipart/form-data" in schema["paths"][path]["post"]["requestBody"]["content"]
    for name in ("ClassifyResponse", "DetectResponse", "ModelsResponse", "Health"):
        assert name in schema["components"]["schemas"]


async def test_overload_is_refused_at_once_with_retry_after(tmp_path: Path) -> None:
    app, backend = classifier(tmp_path, max_batch_size=1, max_queue_size=2, max_queue_delay_ms=0, retry_after_s=3)
    async with running_app(app) as client:
        backend.hold = threading.Event()  # after the warm-up
        calls = [asyncio.ensure_future(client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}))
                 for _ in range(8)]  # fmt: skip
        batcher = batcher_of(app)
        await until(lambda: sum(c.done() for c in calls) + batcher.queue_depth + batcher.in_flight == 8)
        refused = [c.result() for c in calls if c.done()]  # answered while the backend is still held
        backend.hold.set()
        codes = [r.status_code for r in await asyncio.gather(*calls)]
    assert len(refused) >= 4  # one running, two (or three) queued: the rest refused at once
    assert codes.count(200) == 8 - len(refused)
    for response in refused:
        assert_error(app, response, 429, "overloaded")
        assert response.headers["retry-after"] == "3"


async def test_concurrent_requests_are_batched_and_the_metrics_show_it(tmp_path: Path) -> None:
    app, backend = classifier(tmp_path, max_queue_delay_ms=0)
    async with running_app(app) as client:
        backend.hold = threading.Event()  # the first batch runs while the others queue up behind it
        calls = [asyncio.ensure_future(client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}))
                 for _ in range(12)]  # fmt: skip
        batcher = batcher_of(app)
        await until(lambda: batcher.queue_depth + batcher.in_flight == 12)
        backend.hold.set()
        responses = await asyncio.gather(*calls)
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200] * 12
    assert max(backend.sizes[-4:]) == 4  # max_batch_size, from the backend's profile
    images = float(re.findall(r'focal_batch_images_total\{model="focal_tiny"\} (\S+)', metrics)[0])
    batches = float(re.findall(r'focal_batch_size_count\{model="focal_tiny"\} (\S+)', metrics)[0])
    assert (images, batches) == (12, len(backend.sizes) - 3)  # warm-up (3 batches) goes around the batcher
    assert batches < 12


async def test_a_request_past_its_deadline_gets_504_and_never_runs(tmp_path: Path) -> None:
    app, backend = classifier(tmp_path, max_batch_size=1, max_queue_delay_ms=0, request_timeout_s=0.2)
    async with running_app(app) as client:
        backend.hold = threading.Event()  # after the warm-up
        warm = len(backend.sizes)
        first = asyncio.ensure_future(client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}))
        batcher = batcher_of(app)
        await until(lambda: batcher.in_flight == 1)
        late = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        assert_error(app, late, 504, "timeout")
        backend.hold.set()
        await first
        await until(lambda: batcher.queue_depth == 0)  # the worker reached the late image (and dropped it)
        metrics = (await client.get("/metrics")).text
    assert len(backend.sizes) == warm + 1  # the first request; the late one never ran
    dropped = re.findall(r'focal_dropped_images_total\{model="focal_tiny",reason="\w+"\} (\S+)', metrics)
    assert sum(float(n) for n in dropped) == 1


async def test_a_client_that_disconnects_has_its_images_dropped_before_they_run(tmp_path: Path) -> None:
    app, backend = classifier(tmp_path, max_batch_size=1, max_queue_delay_ms=0)
    async with running_app(app) as client:
        backend.hold = threading.Event()  # after the warm-up
        warm = len(backend.sizes) + 1  # the warm-up's batches and the busy one
        busy = asyncio.ensure_future(client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}))
        batcher = batcher_of(app)
        await until(
            lambda: len(backend.sizes) == warm
        )  # the busy batch is inside the backend (in_flight is set a bit earlier)
        sent: list[dict[str, Any]] = []
        messages: list[dict[str, Any]] = [
            {"type": "http.request", "body": JPEG, "more_body": False},
            {"type": "http.disconnect"},
        ]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/classify", "raw_path": b"/classify", "query_string": b"",
                 "headers": [(b"content-type", b"image/jpeg")], "http_version": "1.1", "scheme": "http",
                 "server": ("test", 80), "client": ("test", 1), "root_path": "", "app": app}  # fmt: skip
        await asyncio.wait_for(app(scope, receive, send), 5)  # returns once the client is gone, not after the batch
        assert batcher.queue_depth == 1  # still queued, its caller gone
        backend.hold.set()
        assert (await busy).status_code == 200
        await until(lambda: batcher.queue_depth == 0)
        metrics = (await client.get("/metrics")).text
    assert len(backend.sizes) == warm  # the abandoned image never ran
    assert re.search(r'focal_dropped_images_total\{model="focal_tiny",reason="cancelled"\} 1.0', metrics)


async def test_drain_finishes_queued_work_refuses_new_and_closes_the_backend(tmp_path: Path) -> None:
    app, backend = classifier(tmp_path, max_batch_size=2, max_queue_delay_ms=0)
    state = app.state.service
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await wait_ready(client)
            backend.hold = threading.Event()
            calls = [
                asyncio.ensure_future(client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}))
                for _ in range(8)
            ]
            batcher = batcher_of(app)
            await until(lambda: batcher.queue_depth + batcher.in_flight == 8)  # all queued or running
            state.begin_draining()  # what SIGTERM does first
            ready = await client.get("/readyz")
            late = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
            assert (await client.get("/healthz")).status_code == 200
            backend.hold.set()
    # The lifespan's end drained the queue before closing the backend.
    responses = await asyncio.gather(*calls)
    assert [r.status_code for r in responses] == [200] * 8
    assert (ready.status_code, ready.json()["detail"]) == (503, "draining")
    assert_error(app, late, 503, "unavailable")
    assert late.headers["retry-after"] == "1"
    assert backend.closed


async def test_while_loading_readiness_is_503_requests_503_and_liveness_200(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, classify_manifest(num_classes=5))
    loaded = threading.Event()

    def slow_loader(*_: Any) -> FakeBackend:
        loaded.wait(10)
        return FakeBackend(fixed_logits(5))

    app = create_app(Settings(models=[folder]), slow_loader)
    async with running_app(app, ready=False) as client:
        ready = await client.get("/readyz")
        live = await client.get("/healthz")
        early = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        loaded.set()
        await wait_ready(client)
        models = (await client.get("/v1/models")).json()["models"]
    assert (ready.status_code, ready.json()["detail"]) == (503, "loading")
    assert live.status_code == 200
    assert_error(app, early, 503, "unavailable")
    assert "still loading" in early.json()["error"]["message"]
    assert models[0] | {"warmup_seconds": None} == models[0] | {
        "name": "focal_tiny", "task": "classify", "backend": "fake", "ready": True, "status": "ready",
        "weights": "random-init", "random_init": True, "max_batch_size": 4, "warmup_seconds": None,
    }  # fmt: skip


async def test_a_model_that_fails_to_load_makes_the_server_not_ready_and_not_live(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, classify_manifest(num_classes=5))

    def broken(*_: Any) -> FakeBackend:
        raise RuntimeError("CUDA driver too old")

    async with running_app(create_app(Settings(models=[folder]), broken), ready=False) as client:
        for _ in range(100):
            ready = await client.get("/readyz")
            if "failed" in ready.json()["detail"]:
                break
            await asyncio.sleep(0.01)
        live = await client.get("/healthz")
    assert ready.status_code == live.status_code == 503
    assert "CUDA driver too old" in ready.json()["detail"]
    assert "CUDA driver too old" in live.json()["detail"]


async def test_probes_metrics_and_docs(tmp_path: Path) -> None:
    app, _ = classifier(tmp_path)
    async with running_app(app) as client:
        await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert (await client.get(path)).json()["status"] == "ok"
        metrics = (await client.get("/metrics")).text
        docs = await client.get("/docs")
    for name in ("focal_requests_total", "focal_request_duration_seconds_bucket", "focal_queue_wait_seconds_bucket",
                 "focal_batch_inference_seconds_bucket", "focal_batch_size_bucket", "focal_queue_depth",
                 "focal_batch_images_total", "focal_model_info", "focal_batches_total"):  # fmt: skip
        assert name in metrics
    assert 'focal_requests_total{code="200",endpoint="/classify",protocol="http"} 1.0' in metrics
    assert 'weights="random-init"' in metrics
    assert docs.status_code == 200


# -- the health state machine, as the probes show it -----------------------------------------------------
async def _until(client: httpx.AsyncClient, path: str, status: int, timeout_s: float = 5.0) -> httpx.Response:
    for _ in range(int(timeout_s / 0.01)):
        response = await client.get(path)
        if response.status_code == status:
            return response
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} did not turn {status}: {response.text}")


async def test_failing_batches_make_the_model_unready_and_a_probe_brings_it_back(tmp_path: Path) -> None:
    """The defect this fixes: readiness used to stay false until a request's batch succeeded, and an
    unready pod receives no requests. Now the model probes itself and recovers with no traffic."""
    app, backend = classifier(tmp_path, max_batch_size=1, failing_after_batches=2, probe_backoff_s=0.05)
    async with running_app(app) as client:
        backend.failing = "CUDA error: an illegal memory access"
        for _ in range(2):
            failed = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
            assert_error(app, failed, 500, "backend_error")
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "failing: the last 2 batches failed (RuntimeError: CUDA error" in ready.json()["detail"]
        assert (await client.get("/healthz")).status_code == 200  # not for long enough to restart
        ran = len(backend.sizes)
        await until(lambda: len(backend.sizes) >= ran + 2)  # probes ran, and failed
        backend.failing = None  # the device is back; no client sends anything
        await _until(client, "/readyz", 200)
        metrics = (await client.get("/metrics")).text
    assert re.search(r'focal_health_probes_total\{model="focal_tiny",outcome="failed"\} [1-9]', metrics)
    assert 'focal_health_probes_total{model="focal_tiny",outcome="recovered"} 1.0' in metrics


async def test_a_failure_that_persists_turns_liveness_false(tmp_path: Path) -> None:
    app, backend = classifier(
        tmp_path, max_batch_size=1, failing_after_batches=1, probe_backoff_s=0.02, unhealthy_after_s=0.2
    )
    async with running_app(app) as client:
        backend.failing = "device lost"
        await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        live = await _until(client, "/healthz", 503)
    assert "failing for" in live.json()["detail"]
    assert "device lost" in live.json()["detail"]


async def test_a_stuck_batch_turns_liveness_false_until_it_returns(tmp_path: Path) -> None:
    app, backend = classifier(tmp_path, max_batch_size=1, stuck_batch_s=0.1)
    async with running_app(app) as client:
        backend.hold = threading.Event()  # after the warm-up
        call = asyncio.ensure_future(client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}))
        live = await _until(client, "/healthz", 503)
        backend.hold.set()
        assert (await call).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
    assert "backend stuck" in live.json()["detail"]


async def test_shutdown_during_warm_up_leaves_the_running_backend_alone(tmp_path: Path) -> None:
    """Closing a backend under a running call would free memory in use (TensorRT: a crash)."""
    app, backend = classifier(tmp_path, drain_timeout_s=0.1)
    backend.hold = threading.Event()  # the warm-up's first batch does not return
    async with running_app(app, ready=False):
        await until(lambda: len(backend.sizes) == 1)
    assert not backend.closed
    backend.hold.set()


async def test_a_batch_cut_short_by_shutdown_is_not_a_failure(tmp_path: Path) -> None:
    app, backend = classifier(tmp_path, drain_timeout_s=0.05, failing_after_batches=1)
    async with running_app(app) as client:
        backend.hold = threading.Event()
        call = asyncio.ensure_future(client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}))
        model = app.state.service.models["focal_tiny"]
        await until(lambda: model.batcher.in_flight == 1)
    assert_error(app, await call, 503, "unavailable")  # the server shut down under it
    assert model.health.phase.value == "ready"
    assert model.health.consecutive_failures == 0
    assert model._probing is None  # no probe started, none left behind
    backend.hold.set()


# -- start-up checks -----------------------------------------------------------------------------------------
def test_start_up_refuses_folders_that_cannot_be_served(tmp_path: Path) -> None:
    good = model_folder(tmp_path / "good", classify_manifest())
    with pytest.raises(ModelLoadError, match="no model given"):
        create_app(Settings())
    with pytest.raises(ModelLoadError, match=r"no manifest.json \(is it a python -m export output folder\?\)"):
        create_app(Settings(models=[tmp_path]))
    other = model_folder(tmp_path / "other", classify_manifest())
    with pytest.raises(ModelLoadError, match="would both be served as 'focal_tiny'; name one with --model NAME=DIR"):
        create_app(Settings(models=[good, other]))
    named = create_app(Settings(models=[good, f"second={other}"])).state.service  # two classifiers, two names
    assert [(p.name, p.folder) for p in named.planned] == [("focal_tiny", good), ("second", other)]
    with pytest.raises(ModelLoadError, match="model name 'bad name!'"):
        create_app(Settings(models=[f"bad name!={other}"]))
    old = model_folder(tmp_path / "old", classify_manifest())
    (old / MANIFEST_NAME).write_text((old / MANIFEST_NAME).read_text().replace(f'"format_version": {FORMAT_VERSION}',
                                                                              '"format_version": 1'))  # fmt: skip
    with pytest.raises(ModelLoadError, match="manifest format 1, this version reads 2; export the model again"):
        create_app(Settings(models=[old]))
    (good / "labels.txt").write_text("just one\n")
    with pytest.raises(ModelLoadError, match="1 labels for 5 classes"):
        create_app(Settings(models=[good]))
