"""Several front-end processes and one model host (`FOCAL_WORKERS` > 1), in-process: the model host
(`service.model_host.hosting`, with a fake backend) and a front-end app (`create_app(...,
model_host_socket=...)`) in one event loop, talking over a real Unix socket with the real messages.
What they cannot show here (process start-up, signals, exit codes, metrics summed across processes)
is in test_server.py, with real processes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.ipc import ProtocolError, array_of
from service.metrics import Metrics
from service.model_host import ModelHost, hosting
from service.models import ServedModel, check_model_folders
from service.remote import HostLink, RemoteBatcher
from service.settings import DEFAULT_WORKERS_CAP, Settings, usable_cores
from service.state import ServiceState
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
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def host_and_front_end(
    tmp_path: Path,
    backend: FakeBackend | None = None,
    folder: Path | None = None,
    backends: Callable[..., FakeBackend] | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[ServiceState, httpx.AsyncClient, ModelHost]]:
    """The model host (its state, and itself) and a front end (an httpx client calling it), ready.
    Default: a classifier on `backend`; or the export `folder`, its backends from `backends`."""
    backend = backend or FakeBackend(fixed_logits(5))
    folder = folder or model_folder(tmp_path / "classifier", classify_manifest(num_classes=5))
    config = Settings(models=[folder], grpc_port=0, **settings)
    host_state = ServiceState(
        settings=config,
        metrics=Metrics(),
        preprocess_pool=ThreadPoolExecutor(1),
        planned=check_model_folders(config.models),
        backends=backends or (lambda *_: backend),
    )
    socket_path = str(tmp_path / "host.sock")
    async with hosting(host_state, socket_path) as host:
        app = create_app(config, model_host_socket=socket_path)
        async with running_app(app) as client:
            yield host_state, client, host


def served(state: ServiceState) -> ServedModel:
    model = state.models["focal_tiny"]
    assert isinstance(model, ServedModel)
    return model


async def test_a_front_end_classifies_through_the_host_as_one_process_does(tmp_path: Path) -> None:
    backend = FakeBackend(fixed_logits(5))
    async with host_and_front_end(tmp_path, backend) as (host, client, _):
        response = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
        assert [r["class_id"] for r in response.json()["results"][0]["predictions"]] == [0, 1, 2, 3, 4]
        assert response.json()["model"]["backend"] == "fake"  # the host's model, as the host describes it
        listed = (await client.get("/v1/models")).json()["models"]
        assert [(m["name"], m["ready"], m["backend"]) for m in listed] == [("focal_tiny", True, "fake")]
        assert backend.sizes[-1] == 1  # the sample ran on the host's backend
        # Several images of one request are several samples in the host's one queue.
        many = await client.post("/classify", files=[("image", ("a.jpg", JPEG, "image/jpeg"))] * 3)
        assert len(many.json()["results"]) == 3
        assert served(host).batcher.alive


async def test_one_batch_holds_images_from_several_front_ends(tmp_path: Path) -> None:
    """Two front-end apps on one host: while the backend is busy, images from both wait in the host's one
    queue and run as one batch, which the host's metrics count as holding two front ends' images."""
    backend = FakeBackend(fixed_logits(5))
    settings = {"max_batch_size": 4, "max_queue_delay_ms": 0}
    async with host_and_front_end(tmp_path, backend, **settings) as (host, first, _):
        second_app = create_app(host.settings, model_host_socket=str(tmp_path / "host.sock"))
        async with running_app(second_app) as second:
            backend.hold = threading.Event()
            post = {"content": JPEG, "headers": {"Content-Type": "image/jpeg"}}
            busy = asyncio.ensure_future(first.post("/classify", **post))
            await until(lambda: served(host).batchers[0].backend_running)
            waiting = [asyncio.ensure_future(client.post("/classify", **post)) for client in (first, second, second)]
            await until(lambda: served(host).batcher.queue_depth == 3)
            backend.hold.set()
            assert [r.status_code for r in await asyncio.gather(busy, *waiting)] == [200] * 4
        assert backend.sizes[-2:] == [1, 3]
        text = host.metrics.exposition().decode()
        assert 'focal_batch_front_ends_bucket{le="1.0",model="focal_tiny"} 1.0' in text  # the first batch
        assert 'focal_batch_front_ends_sum{model="focal_tiny"} 3.0' in text  # 1 + 2


async def test_the_hosts_errors_get_the_same_answers(tmp_path: Path) -> None:
    """Queue full (429 with Retry-After), a failed batch (500), a deadline (504): the host raises them,
    the front end answers as one process would."""
    backend = FakeBackend(fixed_logits(5))
    settings = {"max_queue_size": 1, "max_batch_size": 1, "max_queue_delay_ms": 0, "retry_after_s": 4}
    async with host_and_front_end(tmp_path, backend, **settings) as (host, client, _):
        backend.hold = threading.Event()
        post = {"content": JPEG, "headers": {"Content-Type": "image/jpeg"}}
        running = asyncio.ensure_future(client.post("/classify", **post))
        await until(lambda: served(host).batchers[0].backend_running)
        queued = asyncio.ensure_future(client.post("/classify", **post))
        await until(lambda: served(host).batcher.queue_depth == 1)
        refused = await client.post("/classify", **post)
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "overloaded")
        assert refused.headers["retry-after"] == "4"
        backend.hold.set()
        assert [(await running).status_code, (await queued).status_code] == [200, 200]
        backend.hold = None

        backend.failing = "CUDA error 700"
        failed = await client.post("/classify", **post)
        assert (failed.status_code, failed.json()["error"]["code"]) == (500, "backend_error")
        assert "CUDA error 700" in failed.json()["error"]["message"]
        backend.failing = None


async def test_a_deadline_in_the_host_is_a_timeout_in_the_front_end(tmp_path: Path) -> None:
    backend = FakeBackend(fixed_logits(5))
    async with host_and_front_end(tmp_path, backend, request_timeout_s=0.2) as _setup:
        client = _setup[1]
        backend.delay_s = 0.5
        late = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        assert (late.status_code, late.json()["error"]["code"]) == (504, "timeout"), late.text


async def test_health_follows_the_host(tmp_path: Path) -> None:
    """A model failing in the host is not ready in the front end either, with the host's reason; a
    recovered one is ready again."""
    backend = FakeBackend(fixed_logits(5))
    settings = {"failing_after_batches": 2, "probe_backoff_s": 0.05}
    async with host_and_front_end(tmp_path, backend, **settings) as (_, client, _):
        backend.failing = "device lost"
        for _ in range(2):
            await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})

        async def readiness() -> httpx.Response:
            return await client.get("/readyz")

        for _ in range(200):
            ready = await readiness()
            if ready.status_code == 503:
                break
            await asyncio.sleep(0.02)
        assert ready.status_code == 503
        assert "device lost" in ready.json()["detail"], ready.text
        assert (await client.get("/healthz")).status_code == 200  # failing, not yet for long
        backend.failing = None  # the host's probe recovers it
        for _ in range(200):
            if (await readiness()).status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert (await readiness()).status_code == 200


async def test_a_caller_that_goes_away_leaves_the_hosts_queue(tmp_path: Path) -> None:
    backend = FakeBackend(fixed_logits(5))
    settings = {"max_batch_size": 1, "max_queue_delay_ms": 0}
    async with host_and_front_end(tmp_path, backend, **settings) as (host, _, _):
        backend.hold = threading.Event()
        link = HostLink(str(tmp_path / "host.sock"))
        await link.connect()
        batcher = RemoteBatcher(link, "focal_tiny", served(host).info())
        sample = np.zeros((3, 32, 32), np.float32)
        running = asyncio.ensure_future(batcher.submit(sample, 10.0))
        await until(lambda: served(host).batchers[0].backend_running)
        queued = asyncio.ensure_future(batcher.submit(sample, 10.0))
        await until(lambda: served(host).batcher.queue_depth == 1)
        queued.cancel()
        await until(lambda: batcher.pending == 1)
        backend.hold.set()
        assert (await running).shape == (5,)
        await until(lambda: served(host).batcher.queue_depth == 0)
        assert backend.sizes == [1, 1]  # the warm-up and the running sample: the cancelled one never ran
        await link.close()


async def test_the_front_end_refuses_model_changes_and_a_wrong_sample(tmp_path: Path) -> None:
    async with host_and_front_end(tmp_path, admin_token="0123456789abcdef") as (host, client, _):
        load = await client.post(
            "/v2/repository/models/focal_tiny/load", headers={"Authorization": "Bearer 0123456789abcdef"}
        )
        assert load.status_code == 501
        assert "FOCAL_WORKERS=1" in load.json()["error"], load.text
        link = HostLink(str(tmp_path / "host.sock"))
        await link.connect()
        wrong = RemoteBatcher(link, "focal_tiny", served(host).info())
        with pytest.raises(Exception, match=r"takes float32 \(3, 32, 32\)") as caught:
            await wrong.submit(np.zeros((3, 8, 8), np.float32), 5.0)
        assert getattr(caught.value, "status", None) == 400
        with pytest.raises(Exception, match="not loaded") as missing:
            await RemoteBatcher(link, "nope", served(host).info()).submit(np.zeros((3, 32, 32), np.float32), 5.0)
        assert getattr(missing.value, "status", None) == 404
        await link.close()


async def test_a_lost_connection_is_made_again(tmp_path: Path) -> None:
    async with host_and_front_end(tmp_path) as (_, client, model_host):
        await model_host.close()  # every front end's connection closed; the host still listens
        await until(lambda: not model_host._connections)
        for _ in range(200):
            ok = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
            if ok.status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert ok.status_code == 200, ok.text
        assert (await client.get("/readyz")).status_code == 200


async def test_a_host_that_is_gone_makes_the_front_end_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.remote.RECONNECT_TIMEOUT_S", 0.2)
    async with host_and_front_end(tmp_path) as (_, client, model_host):
        assert (await client.get("/readyz")).status_code == 200
        assert model_host.server is not None
        model_host.server.close()  # no longer listening, every connection closed: as if the process died
        await model_host.close()
        for _ in range(200):
            if (await client.get("/healthz")).status_code == 503:
                break
            await asyncio.sleep(0.02)
        live = await client.get("/healthz")
        assert live.status_code == 503
        assert "model host" in live.json()["detail"], live.text
        assert (await client.get("/readyz")).status_code == 503
        refused = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        assert refused.status_code == 503, refused.text


async def test_cancelling_a_request_already_answered_is_harmless(tmp_path: Path) -> None:
    """A caller can go away just as its answer arrives: the cancel then finds nothing, and the
    connection (with every other request on it) stays up."""
    async with host_and_front_end(tmp_path) as (host, _, _):
        link = HostLink(str(tmp_path / "host.sock"))
        await link.connect()
        sample = np.zeros((3, 32, 32), np.float32)
        request_id, answer = link.start({"op": "infer", "model": "focal_tiny", "timeout": 5.0}, sample)
        await answer
        link.cancel(request_id)
        batcher = RemoteBatcher(link, "focal_tiny", served(host).info())
        assert (await batcher.submit(sample, 5.0)).shape == (5,)
        assert link.alive
        await link.close()


def test_a_payload_must_match_its_header() -> None:
    assert array_of({"dtype": "<f4", "shape": [2, 3]}, bytes(24)).shape == (2, 3)
    with pytest.raises(ProtocolError):
        array_of({"dtype": "<f4", "shape": [2, 3]}, bytes(20))
    with pytest.raises(ProtocolError):
        array_of({"dtype": "|O", "shape": [1]}, bytes(8))


def test_default_workers_are_the_cores_capped_or_one_with_the_repository_api(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(workers=3).worker_count() == 3
    assert Settings().worker_count() == min(usable_cores(), DEFAULT_WORKERS_CAP)
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(64)))
    assert Settings().worker_count() == DEFAULT_WORKERS_CAP
    # The model repository API on: one process by default (loads and unloads need it), unless asked.
    assert Settings(admin_token="0123456789abcdef").worker_count() == 1
    assert Settings(admin_token="0123456789abcdef", workers=4).worker_count() == 4


async def test_a_detector_runs_each_canvas_on_its_own_backend_in_the_host(tmp_path: Path) -> None:
    """Front ends route an image to its canvas and send it as it is; the host takes a sample of any of
    the model's canvases to that canvas's batcher, and refuses other shapes."""
    backends: list[FakeBackend] = []

    def rows(batch: np.ndarray) -> np.ndarray:
        out = np.zeros((len(batch), 20, 6), np.float32)
        out[:, 0] = [8, 8, 40, 40, 0.9, 1]
        return out

    def loader(*_: Any) -> FakeBackend:
        backends.append(FakeBackend(rows))
        return backends[-1]

    folder = model_folder(tmp_path / "detector", detect_manifest(canvas=(64, 96), more_canvases=((96, 64),)))
    async with host_and_front_end(tmp_path, folder=folder, backends=loader) as (host, client, _):
        files = [("image", ("w.png", encode(photo((256, 128)), "PNG"), "image/png")),
                 ("image", ("t.png", encode(photo((128, 256)), "PNG"), "image/png"))]  # fmt: skip
        response = await client.post("/detect", files=files)
        assert response.status_code == 200, response.text
        assert [r["canvas"] for r in response.json()["results"]] == [[64, 96], [96, 64]]
        assert [b.shapes for b in backends] == [{(3, 64, 96)}, {(3, 96, 64)}]
        assert (await client.get("/v1/models")).json()["models"][0]["canvases"] == [[64, 96], [96, 64]]
        link = HostLink(str(tmp_path / "host.sock"))
        await link.connect()
        model = host.models["focal_tiny_retinanet"]
        try:
            with pytest.raises(Exception, match=r"takes float32 \(3, 64, 96\) or \(3, 96, 64\)") as caught:
                await RemoteBatcher(link, model.name, model.info()).submit(np.zeros((3, 64, 64), np.float32), 5.0)
            assert getattr(caught.value, "status", None) == 400
        finally:
            await link.close()
