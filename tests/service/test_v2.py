"""The Open Inference Protocol (KServe v2) in-process: the tensor codec, REST metadata and inference
(JSON and binary tensors, both input forms), its errors, the model repository and the version switch
under load, and gRPC through `tritonclient.grpc.aio` on a real port of the in-process app.
(`create_app` + fake backends; the numbers against real exports are in `test_v2_server.py`.)"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from manifest import MANIFEST_NAME, read_manifest
from service.app import create_app
from service.launch import free_port
from service.settings import Settings
from service.tasks.classify import softmax
from service.v2 import tensors
from tests.support import (
    JPEG,
    FakeBackend,
    classify_manifest,
    detect_manifest,
    encode,
    model_folder,
    photo,
    running_app,
    until,
)

pytestmark = pytest.mark.anyio
TOKEN = "s3cret-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SIZE = (32, 32)


def by_brightness(batch: np.ndarray) -> np.ndarray:
    """Logits that depend on each input's pixels (so the input form's preprocessing shows)."""
    means = batch.reshape(len(batch), -1).mean(axis=1)
    return np.stack([means * k for k in range(5)], axis=1).astype(np.float32)


def classifier_folder(tmp_path: Path, name: str = "classifier", version: str = "1") -> Path:
    folder = model_folder(tmp_path / name, classify_manifest(num_classes=5, size=SIZE))
    manifest = read_manifest(folder)
    manifest.model_version = version
    manifest.write(folder)
    return folder


def app_with(folders: list[Any], backends: dict[str, FakeBackend] | None = None, **settings: Any) -> FastAPI:
    """An app over these folders. Each load of a folder gets a fresh fake, recorded as `backends[folder
    name]`, unless the test put one there that no load has taken yet."""
    made = backends if backends is not None else {}
    taken: set[int] = set()

    def loader(checked: Any, _: Settings) -> FakeBackend:
        name = checked.folder.name
        if name not in made or id(made[name]) in taken:
            made[name] = FakeBackend(by_brightness)
        taken.add(id(made[name]))
        return made[name]

    return create_app(Settings(models=folders, **settings), loader)


def infer_body(inputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"inputs": inputs, **extra}


def pixels(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, *SIZE)).astype(np.float32)


# -- the tensor codec ------------------------------------------------------------------------------------
def test_tensors_round_trip_in_both_wire_forms() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(tensors.from_raw("x", "FP32", [2, 3], tensors.to_raw(array)), array)
    assert np.array_equal(tensors.from_json("x", "FP32", [2, 3], tensors.to_json(array)), array)
    assert np.array_equal(tensors.from_json("x", "FP32", [2, 3], [[0, 1, 2], [3, 4, 5]]), array)  # nested
    assert tensors.from_json("x", "UINT8", [3], [0, 255, 7.0]).tolist() == [0, 255, 7]
    blobs = np.array([b"\xff\xd8jpeg", b"", b"png"], dtype=np.object_)
    raw = tensors.to_raw(blobs)
    assert raw[:4] == struct.pack("<I", 6)  # each element: its little-endian length, then its bytes
    assert list(tensors.from_raw("x", "BYTES", [3], raw)) == list(blobs)
    assert list(tensors.from_json("x", "BYTES", [3], tensors.to_json(blobs))) == list(blobs)  # base64 in JSON
    assert tensors.datatype_of(np.zeros(1, np.int32)) == "INT32"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: tensors.from_raw("x", "FP32", [2], b"\0" * 4), "4 bytes of data for shape"),
        (lambda: tensors.from_raw("x", "FP8", [1], b"\0"), "unknown datatype 'FP8'"),
        (lambda: tensors.from_raw("x", "FP32", [-1], b""), "must be non-negative integers"),
        (lambda: tensors.from_raw("x", "BYTES", [1], b"\x09\0\0\0abc"), "cut short"),
        (lambda: tensors.from_raw("x", "BYTES", [1], b"\x01\0\0\0ab"), "1 bytes left over"),
        (lambda: tensors.from_raw("x", "BYTES", [2], b"\x01\0\0\0a\0\0\0"), "end before element 2"),
        (lambda: tensors.from_raw("x", "BYTES", [10**12], b"\0" * 8), "8 bytes cannot hold 1000000000000"),
        (lambda: tensors.from_json("x", "FP32", [3], [1, 2]), "2 elements for shape [3]"),
        (lambda: tensors.from_json("x", "FP32", [2], ["1", 2]), "the data are not FP32"),
        (lambda: tensors.from_json("x", "FP32", [2], [1, None]), "the data are not FP32"),
        (lambda: tensors.from_json("x", "BYTES", [1], ["not base64!"]), "not valid base64"),
        # UINT8 pixels (a classifier's default input): a cast would wrap 256 to 0 and cut 0.5 to 0
        (lambda: tensors.from_json("x", "UINT8", [3], [300, 1, 2]), r"must lie in 0\.\.255"),
        (lambda: tensors.from_json("x", "UINT8", [2], [-1, 2]), r"must lie in 0\.\.255"),
        (lambda: tensors.from_json("x", "UINT8", [2], [0.5, 2]), "must be whole numbers"),
        (lambda: tensors.from_json("x", "BYTES", [1], [3]), "must be base64 strings"),
    ],
)
def test_tensor_errors_name_the_problem(call: Any, message: str) -> None:
    with pytest.raises(tensors.TensorError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


# -- REST: metadata and readiness ------------------------------------------------------------------------
async def test_metadata_and_readiness(tmp_path: Path) -> None:
    detector = model_folder(tmp_path / "detector", detect_manifest(num_classes=3, canvas=(64, 64), rows=20))
    app = create_app(
        Settings(models=[classifier_folder(tmp_path), detector]),
        lambda checked, _: (
            FakeBackend(lambda b: np.zeros((len(b), 20, 6), np.float32))
            if checked.manifest.task == "detect"
            else FakeBackend(by_brightness)
        ),
    )
    async with running_app(app) as client:
        server = (await client.get("/v2")).json()
        assert server["name"] == "focal-serve"
        assert {"binary_tensor_data", "model_repository"} <= set(server["extensions"])
        meta = (await client.get("/v2/models/focal_tiny")).json()
        assert meta == {
            "name": "focal_tiny",
            "versions": ["1"],
            "platform": "fake",
            "inputs": [
                {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, *SIZE]},
                {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": [-1, 5]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]},
            ],
        }
        assert (await client.get("/v2/models/focal_tiny/versions/1")).json() == meta
        detect_meta = (await client.get("/v2/models/focal_tiny_retinanet")).json()
        assert detect_meta["outputs"] == [
            {"name": "detections", "datatype": "FP32", "shape": [-1, 5, 6]},
            {"name": "num_detections", "datatype": "INT32", "shape": [-1]},
        ]
        ready = await client.get("/v2/models/focal_tiny/ready")
        assert ready.status_code == 200
        assert ready.json()["ready"] is True
        assert (await client.get("/v2/health/ready")).status_code == 200
        for path in ("/v2/models/nope", "/v2/models/focal_tiny/versions/2", "/v2/models/nope/ready"):
            missing = await client.get(path)
            assert missing.status_code == 404, path
            assert set(missing.json()) == {"error"}
            assert isinstance(missing.json()["error"], str)
        assert (await client.get("/v1/models")).json()["models"][0]["version"] == "1"


# -- REST: inference ---------------------------------------------------------------------------------------
async def test_infer_with_json_and_binary_tensors(tmp_path: Path) -> None:
    async with running_app(app_with([classifier_folder(tmp_path)])) as client:
        batch = pixels(2)
        expected = by_brightness(batch)
        body = infer_body(
            [{"name": "pixels", "datatype": "FP32", "shape": list(batch.shape), "data": batch.ravel().tolist()}],
            id="req-7",
        )
        answer = await client.post("/v2/models/focal_tiny/infer", json=body)
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["id"] == "req-7"
        assert result["model_name"] == "focal_tiny"
        assert result["model_version"] == "1"
        outputs = {o["name"]: o for o in result["outputs"]}
        assert outputs["logits"]["shape"] == [2, 5]
        assert outputs["logits"]["datatype"] == "FP32"
        assert np.array_equal(np.asarray(outputs["logits"]["data"], np.float32).reshape(2, 5), expected)
        probabilities = np.asarray(outputs["probabilities"]["data"]).reshape(2, 5)
        assert np.allclose(probabilities, softmax(expected.astype(np.float64)), atol=1e-7)

        # The binary extension both ways; one output asked for, in binary.
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [2, 3, *SIZE],
                        "parameters": {"binary_data_size": batch.nbytes},
                    }
                ],
                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            }
        ).encode()
        answer = await client.post(
            "/v2/models/focal_tiny/versions/1/infer",
            content=head + batch.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
        )
        assert answer.status_code == 200, answer.text
        length = int(answer.headers["Inference-Header-Content-Length"])
        result = json.loads(answer.content[:length])
        assert [o["name"] for o in result["outputs"]] == ["logits"]
        assert result["outputs"][0]["parameters"]["binary_data_size"] == expected.nbytes
        assert np.array_equal(np.frombuffer(answer.content[length:], np.float32).reshape(2, 5), expected)

        # binary_data_output makes every output binary
        body["parameters"] = {"binary_data_output": True}
        answer = await client.post("/v2/models/focal_tiny/infer", json=body)
        result = json.loads(answer.content[: int(answer.headers["Inference-Header-Content-Length"])])
        assert all("data" not in o and o["parameters"]["binary_data_size"] == 40 for o in result["outputs"])


async def test_image_bytes_give_what_classify_gives(tmp_path: Path) -> None:
    async with running_app(app_with([classifier_folder(tmp_path)])) as client:
        body = infer_body(
            [{"name": "image_bytes", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(JPEG).decode()] * 2}]
        )
        answer = await client.post("/v2/models/focal_tiny/infer", json=body)
        assert answer.status_code == 200, answer.text
        probabilities = {o["name"]: o for o in answer.json()["outputs"]}["probabilities"]["data"]
        classified = await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
        top = classified.json()["results"][0]["predictions"]
        assert [round(probabilities[p["class_id"]], 6) for p in top] == [round(p["score"], 6) for p in top]
        assert probabilities[:5] == probabilities[5:]  # the same image twice


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": []}, 400, "malformed inference request"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32]}]}, 400, "neither 'data'"),
        ({"inputs": [{"name": "other", "datatype": "FP32", "shape": [1], "data": [1]}]}, 400, "unknown input 'other'"),
        ({"inputs": [{"name": "pixels", "datatype": "FP16", "shape": [1], "data": [1]}]}, 400, "must be FP32"),
        (
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]},
            400,
            "has shape [1, 3, 8, 8]",
        ),
        (
            {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]},
            400,
            "could not be decoded",
        ),
        ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [0], "data": []}]}, 400, "no image"),
        (
            {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [3], "data": ["aGk="] * 3}]},
            413,
            "3 images in one request; the limit is 2",
        ),
        (
            {
                "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}],
                "outputs": [{"name": "scores"}],
            },
            400,
            "unknown output 'scores'",
        ),
    ],
)
async def test_bad_requests_get_the_protocols_error(tmp_path: Path, body: Any, status: int, message: str) -> None:
    async with running_app(app_with([classifier_folder(tmp_path)], max_images_per_request=2)) as client:
        answer = await client.post("/v2/models/focal_tiny/infer", json=body)
        assert answer.status_code == status, answer.text
        assert list(answer.json()) == ["error"]
        assert message in answer.json()["error"]


async def test_binary_extension_errors(tmp_path: Path) -> None:
    async with running_app(app_with([classifier_folder(tmp_path)])) as client:
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 3, 32, 32],
                        "parameters": {"binary_data_size": 12288},
                    }
                ]
            }
        ).encode()
        url = "/v2/models/focal_tiny/infer"
        cases = [
            (head + b"\0" * 100, str(len(head)), "runs past the body's end"),
            (head + b"\0" * 12290, str(len(head)), "2 bytes after the last binary input"),
            (head, "x", "is not a length within the body"),
            (head[:-3], str(len(head) - 3), "malformed inference request"),
        ]
        for content, length, message in cases:
            answer = await client.post(url, content=content, headers={"Inference-Header-Content-Length": length})
            assert answer.status_code == 400, answer.text
            assert message in answer.json()["error"]
        gzip = await client.post(url, content=b"x", headers={"Content-Encoding": "gzip"})
        assert gzip.status_code == 415
        assert "Content-Encoding" in gzip.json()["error"]
        big = await client.post(url, content=b"x" * 100, headers={"Content-Length": str(10**9)})
        assert big.status_code == 413
        assert list(big.json()) == ["error"]


async def test_detector_parameters_and_canvas_coordinates(tmp_path: Path) -> None:
    def rows(batch: np.ndarray) -> np.ndarray:
        out = np.zeros((len(batch), 20, 6), np.float32)
        out[:, 0] = [10, 10, 30, 40, 0.9, 2]
        out[:, 1] = [50, 50, 60, 60, 0.4, 1]
        return out

    folder = model_folder(tmp_path / "detector", detect_manifest(num_classes=3, canvas=(64, 64), rows=20))
    app = create_app(Settings(models=[folder]), lambda *_: FakeBackend(rows))
    canvas = np.zeros((1, 3, 64, 64), np.float32)
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": canvas.ravel().tolist()}
    async with running_app(app) as client:
        url = "/v2/models/focal_tiny_retinanet/infer"
        answer = (await client.post(url, json=infer_body([tensor]))).json()
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert outputs["num_detections"] == {"name": "num_detections", "datatype": "INT32", "shape": [1], "data": [2]}
        detections = np.asarray(outputs["detections"]["data"], np.float32).reshape(1, 5, 6)
        assert np.allclose(detections[0, :2], [[10, 10, 30, 40, 0.9, 2], [50, 50, 60, 60, 0.4, 1]])  # canvas pixels
        assert not detections[0, 2:].any()
        strict = (await client.post(url, json=infer_body([tensor], parameters={"score_threshold": 0.5}))).json()
        assert {o["name"]: o for o in strict["outputs"]}["num_detections"]["data"] == [1]
        for parameters, message in (({"score_threshold": 2}, "score_threshold"), ({"max_detections": 6}, "1 to 5")):
            bad = await client.post(url, json=infer_body([tensor], parameters=parameters))
            assert bad.status_code == 422
            assert message in bad.json()["error"]


async def test_v2_shares_admission_deadlines_and_drain(tmp_path: Path) -> None:
    backends: dict[str, FakeBackend] = {}
    app = app_with([classifier_folder(tmp_path)], backends, max_batch_size=1, max_queue_size=1, request_timeout_s=0.3)
    body = infer_body([{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}])
    async with running_app(app) as client:
        backend = backends["classifier"]
        backend.hold = threading.Event()
        calls = [asyncio.ensure_future(client.post("/v2/models/focal_tiny/infer", json=body)) for _ in range(4)]
        answers = await asyncio.gather(*calls)
        backend.hold.set()
        statuses = sorted(a.status_code for a in answers)
        assert {429, 504} <= set(statuses), statuses  # a full queue, and a deadline passed
        assert all(list(a.json()) == ["error"] for a in answers if a.status_code != 200)
        metrics = (await client.get("/metrics")).text
        assert 'endpoint="/v2/models/{name}/infer",protocol="v2-http"' in metrics
        app.state.service.begin_draining()
        draining = await client.post("/v2/models/focal_tiny/infer", json=body)
        assert draining.status_code == 503
        assert "shutting down" in draining.json()["error"]


# -- the model repository and the version switch -----------------------------------------------------------
async def test_repository_api_needs_the_admin_token(tmp_path: Path) -> None:
    async with running_app(app_with([classifier_folder(tmp_path)])) as client:
        off = await client.post("/v2/repository/index")
        assert off.status_code == 403
        assert "FOCAL_ADMIN_TOKEN" in off.json()["error"]
    async with running_app(app_with([classifier_folder(tmp_path)], admin_token=TOKEN)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            refused = await client.post("/v2/repository/index", headers=headers)
            assert refused.status_code == 401
            assert refused.headers["WWW-Authenticate"] == "Bearer"
        index = await client.post("/v2/repository/index", headers=ADMIN)
        assert index.json() == [{"name": "focal_tiny", "version": "1", "state": "READY"}]
    with pytest.raises(ValueError, match="admin_token"):
        Settings(admin_token="short")


async def test_version_switch_under_load_fails_no_request(tmp_path: Path) -> None:
    """Continuous /classify and v2 traffic while versions 2 and 3 replace each other: every request is
    answered 200, each by the version it started on, and each replaced model closes once idle. The images
    are large PNGs, so many requests are decoding (holding the model, not yet queued) at each switch."""
    big = base64.b64encode(encode(photo((1024, 768)), "PNG")).decode()
    folders = [classifier_folder(tmp_path, f"v{v}", version=str(v)) for v in (1, 2, 3)]
    backends: dict[str, FakeBackend] = {}
    app = app_with([f"focal_tiny={folders[0]}"], backends, admin_token=TOKEN, max_queue_size=64)
    body = infer_body([{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [big]}])
    statuses: list[int] = []
    versions: list[str] = []
    stop = asyncio.Event()

    async def traffic(client: httpx.AsyncClient, v2: bool) -> None:
        while not stop.is_set():
            if v2:
                answer = await client.post("/v2/models/focal_tiny/infer", json=body)
                versions.append(answer.json().get("model_version", "?") if answer.status_code == 200 else "?")
            else:
                answer = await client.post(
                    "/classify", content=base64.b64decode(big), headers={"Content-Type": "image/png"}
                )
            statuses.append(answer.status_code)

    async with running_app(app) as client:
        backends["v1"].delay_s = 0.01  # requests are in flight at every switch
        clients = [asyncio.ensure_future(traffic(client, v2=i % 2 == 0)) for i in range(6)]
        for folder in (folders[1], folders[2], folders[1]):
            mark = len(statuses)
            await until(lambda: len(statuses) > mark + 20)  # noqa: B023 (the loop waits here)
            loaded = await client.post(
                "/v2/repository/models/focal_tiny/load", headers=ADMIN, json={"parameters": {"folder": str(folder)}}
            )
            assert loaded.status_code == 200, loaded.text
            backends[folder.name].delay_s = 0.01
        mark = len(statuses)
        await until(lambda: len(statuses) > mark + 20)
        stop.set()
        await asyncio.gather(*clients)
        await until(lambda: not app.state.service.repository_tasks)
        assert set(statuses) == {200}  # every request of the whole run, switches included
        assert "?" not in versions
        assert versions[-1] == "2"
        assert {"1", "3"} <= set(versions)
        assert backends["v1"].closed
        assert backends["v3"].closed
        assert not backends["v2"].closed
        index = await client.post("/v2/repository/index", headers=ADMIN)
        assert index.json() == [{"name": "focal_tiny", "version": "2", "state": "READY"}]


async def test_unload_and_reload_and_failed_loads(tmp_path: Path) -> None:
    folder = classifier_folder(tmp_path)
    backends: dict[str, FakeBackend] = {}
    async with running_app(app_with([folder], backends, admin_token=TOKEN)) as client:
        broken = tmp_path / "broken"
        broken.mkdir()
        failed = await client.post(
            "/v2/repository/models/focal_tiny/load", headers=ADMIN, json={"parameters": {"folder": str(broken)}}
        )
        assert failed.status_code == 400
        assert "no manifest.json" in failed.json()["error"]
        assert (await client.get("/v2/models/focal_tiny/ready")).status_code == 200  # the old one still serves
        unknown = await client.post("/v2/repository/models/other/load", headers=ADMIN)
        assert unknown.status_code == 404
        assert "name its export folder" in unknown.json()["error"]

        unloaded = await client.post("/v2/repository/models/focal_tiny/unload", headers=ADMIN)
        assert unloaded.status_code == 200
        assert backends["classifier"].closed
        assert (await client.get("/v2/models/focal_tiny")).status_code == 404
        assert (await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})).status_code == 404
        index = await client.post("/v2/repository/index", headers=ADMIN)
        assert index.json() == [{"name": "focal_tiny", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert (await client.post("/v2/repository/index", headers=ADMIN, json={"ready": True})).json() == []
        assert (await client.post("/v2/repository/models/focal_tiny/unload", headers=ADMIN)).status_code == 404

        del backends["classifier"]  # a reload builds a fresh backend from the folder it was served from
        reloaded = await client.post("/v2/repository/models/focal_tiny/load", headers=ADMIN)
        assert reloaded.json() == {"name": "focal_tiny", "version": "1", "state": "READY"}
        assert (await client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})).status_code == 200

        # A second name beside the first; its warm-up fails: the error says so, and nothing changes.
        other = classifier_folder(tmp_path, "other")
        backends["other"] = FakeBackend(by_brightness)
        backends["other"].failing = "CUDA error: out of memory"
        failed = await client.post(
            "/v2/repository/models/second/load", headers=ADMIN, json={"parameters": {"folder": str(other)}}
        )
        assert failed.status_code == 400
        assert "failed to warm up" in failed.json()["error"]
        assert backends["other"].closed
        assert (await client.get("/v2/models/second")).status_code == 404


async def test_grpc_in_process(tmp_path: Path) -> None:
    """tritonclient.grpc.aio against the app's own gRPC port: metadata, inference, status codes, deadlines."""
    import grpc
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    port = free_port()
    backends: dict[str, FakeBackend] = {}
    app = app_with(
        [classifier_folder(tmp_path)],
        backends,
        grpc_port=port,
        admin_token=TOKEN,
        host="127.0.0.1",
        max_batch_size=1,
        max_queue_size=2,
    )
    async with running_app(app) as http:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("focal_tiny")
            assert not await client.is_model_ready("nope")
            meta = await client.get_model_metadata("focal_tiny", as_json=True)
            assert [i["name"] for i in meta["inputs"]] == ["pixels", "image_bytes"]
            assert (await client.get_server_metadata(as_json=True))["name"] == "focal-serve"

            batch = pixels(2, seed=3)
            given = grpcclient.InferInput("pixels", list(batch.shape), "FP32")
            given.set_data_from_numpy(batch)
            result = await client.infer("focal_tiny", [given], request_id="g-1")
            assert np.array_equal(result.as_numpy("logits"), by_brightness(batch))
            assert result.get_response().id == "g-1"
            images = grpcclient.InferInput("image_bytes", [1], "BYTES")
            images.set_data_from_numpy(np.array([JPEG], dtype=np.object_))
            via_bytes = await client.infer("focal_tiny", [images], outputs=[grpcclient.InferRequestedOutput("logits")])
            assert via_bytes.as_numpy("probabilities") is None
            assert via_bytes.as_numpy("logits").shape == (1, 5)

            async def code_of(call: Any) -> Any:
                with pytest.raises(InferenceServerException) as caught:
                    await call
                return caught.value.status()

            assert await code_of(client.infer("nope", [given])) == "StatusCode.NOT_FOUND"
            bad = grpcclient.InferInput("pixels", [1, 3, 8, 8], "FP32")
            bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
            assert await code_of(client.infer("focal_tiny", [bad])) == "StatusCode.INVALID_ARGUMENT"
            assert await code_of(client.get_model_repository_index()) == "StatusCode.UNAUTHENTICATED"
            index = await client.get_model_repository_index(headers={"authorization": f"Bearer {TOKEN}"}, as_json=True)
            assert index["models"] == [{"name": "focal_tiny", "version": "1", "state": "READY"}]

            auth = {"authorization": f"Bearer {TOKEN}"}
            await client.load_model("focal_tiny", headers=auth)  # reloaded from its folder: a fresh backend
            assert await client.is_model_ready("focal_tiny")

            # One call running (held), two queued, the rest refused at once; the queued ones reach the
            # call's deadline, which is the request's.
            backend = backends["classifier"]
            backend.hold, started = threading.Event(), len(backend.sizes)
            one = grpcclient.InferInput("pixels", [1, 3, *SIZE], "FP32")
            one.set_data_from_numpy(pixels(1))
            calls = [asyncio.ensure_future(code_of(client.infer("focal_tiny", [one], client_timeout=0.5)))]
            await until(lambda: len(backend.sizes) > started)
            calls += [asyncio.ensure_future(code_of(client.infer("focal_tiny", [one], client_timeout=0.5)))
                      for _ in range(5)]  # fmt: skip
            codes = await asyncio.gather(*calls)
            backend.hold.set()
            assert sorted(codes).count("StatusCode.RESOURCE_EXHAUSTED") == 3, codes
            assert sorted(codes).count("StatusCode.DEADLINE_EXCEEDED") == 3, codes

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:  # grpc.health.v1 for probes
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                health = health_pb2_grpc.HealthStub(channel)
                for service in ("", "ready", "live"):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
            metrics = (await http.get("/metrics")).text
            assert 'code="NOT_FOUND",endpoint="ModelInfer",protocol="v2-grpc"' in metrics

            app.state.service.begin_draining()
            assert await code_of(client.infer("focal_tiny", [given])) == "StatusCode.UNAVAILABLE"
        finally:
            await client.close()


def test_manifest_version_default_and_check(tmp_path: Path) -> None:
    folder = classifier_folder(tmp_path, version="2024.11-b")
    assert read_manifest(folder).model_version == "2024.11-b"
    data = json.loads((folder / MANIFEST_NAME).read_text())
    del data["model_version"]  # manifests written before the field read as version 1
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(folder).model_version == "1"


# -- limits, malformed input, readiness, and the repository's edges -----------------------------------------
async def test_sizes_are_checked_before_anything_is_decoded(tmp_path: Path) -> None:
    async with running_app(app_with([classifier_folder(tmp_path)], max_images_per_request=2)) as client:
        url = "/v2/models/focal_tiny/infer"
        many = {"inputs": [{"name": f"x{i}", "datatype": "FP32", "shape": [1], "data": [0]} for i in range(5)]}
        assert (await client.post(url, json=many)).status_code == 400  # at most 4 inputs, before decoding any
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image_bytes",
                        "datatype": "BYTES",
                        "shape": [5_000_000],
                        "parameters": {"binary_data_size": 20_000_000},
                    }
                ]
            }
        ).encode()
        huge = await client.post(
            url, content=head + b"\0" * 20_000_000, headers={"Inference-Header-Content-Length": str(len(head))}
        )
        assert huge.status_code == 413
        assert "5000000 images in one request; the limit is 2" in huge.json()["error"]
        odd = await client.post(url, content=head, headers={"Inference-Header-Content-Length": b"\xb2"})
        assert odd.status_code == 400
        zero = json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [2**40, 2**40, 0],
                        "parameters": {"binary_data_size": 0},
                    }
                ]
            }
        ).encode()
        answer = await client.post(url, content=zero, headers={"Inference-Header-Content-Length": str(len(zero))})
        assert answer.status_code == 400, answer.text


async def test_a_failing_model_is_not_ready_over_both_protocols(tmp_path: Path) -> None:
    import tritonclient.grpc.aio as grpcclient

    port = free_port()
    backends: dict[str, FakeBackend] = {}
    app = app_with([classifier_folder(tmp_path)], backends, failing_after_batches=1, probe_backoff_s=60, grpc_port=port)
    body = infer_body([{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}])
    async with running_app(app) as client:
        backends["classifier"].failing = "CUDA error"
        assert (await client.post("/v2/models/focal_tiny/infer", json=body)).status_code == 500
        ready = await client.get("/v2/models/focal_tiny/ready")
        assert ready.status_code == 503  # tritonclient.http reads readiness from the status alone
        assert "failing" in ready.json()["error"]
        grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert not await grpc_client.is_model_ready("focal_tiny")
        finally:
            await grpc_client.close()


async def test_repository_refuses_changes_while_the_server_starts(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(checked: Any, _: Settings) -> FakeBackend:
        release.wait(10)
        return FakeBackend(by_brightness)

    app = create_app(Settings(models=[classifier_folder(tmp_path)], admin_token=TOKEN), slow)
    async with running_app(app, ready=False) as client:
        refused = await client.post("/v2/repository/models/focal_tiny/load", headers=ADMIN)
        assert refused.status_code == 503
        assert "still loading its models" in refused.json()["error"]
        release.set()


async def test_an_unload_whose_caller_goes_away_still_closes_the_model(tmp_path: Path) -> None:
    from service import repository

    backends: dict[str, FakeBackend] = {}
    app = app_with([classifier_folder(tmp_path)], backends)
    async with running_app(app):
        state = app.state.service
        with state.models["focal_tiny"].lease():  # a request still running on it
            call = asyncio.ensure_future(repository.unload_model(state, "focal_tiny"))
            await until(lambda: "focal_tiny" not in state.models)
            call.cancel()  # the client (a gRPC deadline, a closed connection) is gone
            with pytest.raises(asyncio.CancelledError):
                await call
            assert not backends["classifier"].closed
        await until(lambda: backends["classifier"].closed)  # the unload went on without its caller


def test_settings_refuse_one_port_for_both_protocols() -> None:
    with pytest.raises(ValueError, match="give gRPC its own port"):
        Settings(port=9000, grpc_port=9000)
    token = Settings(admin_token="  a-token-of-20-chars\n").admin_token  # read from a file: a newline at the end
    assert token is not None
    assert token.get_secret_value() == "a-token-of-20-chars"
