"""Protocol benchmark: `/classify` beside the Open Inference Protocol (REST JSON, REST binary, gRPC),
the same server, images and concurrency, measured in one run.

    python -m bench.protocols [--concurrency 1 16] [--seconds 8] [--rounds 2]

For each model (a micro Focal, whose cost is almost all host path, so protocol overhead shows;
and Focal-T, where the model dominates), one server (`python -m service`, gRPC on) and, per
concurrency, every path in turn for `--rounds` rounds (interleaved, so drift on a shared machine
hits all paths alike). Every path sends the same 640x480 JPEG, which the server decodes and
preprocesses:

- `classify`: `POST /classify`, the JPEG as the body;
- `v2-rest-json`: `POST /v2/models/{name}/infer`, `image_bytes` as base64 in JSON;
- `v2-rest-binary`: the same with Triton's binary tensor extension (what tritonclient.http sends);
- `v2-grpc`: `ModelInfer` with raw contents, through tritonclient's generated stubs on grpc.aio.

Requests are built once; the clients share the server's 2 cores, and an httpx request costs the
client more CPU than a grpc.aio call does. Results: bench/results/protocols.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import onnxruntime as ort
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.cpu_throughput import RESULTS, _cpu_name
from bench.load import _percentile, sample_jpeg
from export.options import ExportOptions
from export.pipeline import run_export
from service.launch import free_port, running_server

PATHS = ("classify", "v2-rest-json", "v2-rest-binary", "v2-grpc")
MODELS = {
    # A micro Focal (widths 32..256, one block per stage): the host path is most of the cost.
    "micro": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]},
    "focal_tiny": {},
}
Send = Callable[[], Awaitable[bool]]


async def _drive(send: Send, concurrency: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < end:
            start = time.perf_counter()
            if await send():
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors, "elapsed": time.monotonic() - started}


async def _measure(url: str, grpc_target: str, concurrency: int, seconds: float, rounds: int) -> dict[str, Any]:
    jpeg = sample_jpeg((640, 480))
    infer_url = f"{url}/v2/models/focal_tiny/infer"
    json_body = json.dumps(
        {
            "inputs": [
                {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(jpeg).decode()]}
            ]
        }
    ).encode()
    raw = struct.pack("<I", len(jpeg)) + jpeg
    head = json.dumps(
        {
            "inputs": [
                {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw)}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    request = service_pb2.ModelInferRequest(model_name="focal_tiny")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(raw)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        httpx.AsyncClient(timeout=120, limits=limits) as client,
        grpc.aio.insecure_channel(grpc_target) as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def classify() -> bool:
            answer = await client.post(f"{url}/classify", content=jpeg, headers={"Content-Type": "image/jpeg"})
            return answer.status_code == 200

        async def rest_json() -> bool:
            answer = await client.post(infer_url, content=json_body, headers={"Content-Type": "application/json"})
            return answer.status_code == 200

        async def rest_binary() -> bool:
            answer = await client.post(
                infer_url,
                content=head + raw,
                headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
            )
            return answer.status_code == 200

        async def over_grpc() -> bool:
            try:
                await stub.ModelInfer(request, timeout=120)
            except grpc.aio.AioRpcError:
                return False
            return True

        sends: dict[str, Send] = {
            "classify": classify,
            "v2-rest-json": rest_json,
            "v2-rest-binary": rest_binary,
            "v2-grpc": over_grpc,
        }
        for send in sends.values():  # warm connections and the server's caches
            assert await send(), "a warm-up request failed"
        merged: dict[str, dict[str, Any]] = {p: {"latencies": [], "errors": 0, "elapsed": 0.0} for p in PATHS}
        for _ in range(rounds):
            for path in PATHS:
                result = await _drive(sends[path], concurrency, seconds / rounds)
                merged[path]["latencies"] += result["latencies"]
                merged[path]["errors"] += result["errors"]
                merged[path]["elapsed"] += result["elapsed"]
    rows = {}
    for path, m in merged.items():
        lat = m["latencies"]
        rows[path] = {
            "images_per_s": round(len(lat) / m["elapsed"], 2),
            "p50_ms": round(_percentile(lat, 50) * 1000, 1),
            "p95_ms": round(_percentile(lat, 95) * 1000, 1),
            "errors": m["errors"],
        }
    return rows


def run(concurrencies: list[int], seconds: float, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for model, kwargs in MODELS.items():
        folder = Path("artifacts") / f"bench-protocols-{model}"
        print(f"{model}: export (or reuse) ...", flush=True)
        run_export(
            ExportOptions(variant="focal_tiny", random_init=True, out=folder, engine="skip", model_kwargs=kwargs),
            log=lambda _: None,
        )
        grpc_port = free_port()
        with running_server(folder, grpc_port=str(grpc_port), max_batch_size="8", max_queue_size="1024") as server:
            results[model] = {}
            for concurrency in concurrencies:
                rows = asyncio.run(_measure(server.url, f"127.0.0.1:{grpc_port}", concurrency, seconds, rounds))
                results[model][str(concurrency)] = rows
                print(f"{model} concurrency {concurrency}: {rows}", flush=True)
    return {
        "machine": {"cpu": _cpu_name(), "onnxruntime": ort.__version__},
        "image": "640x480 JPEG",
        "seconds_per_path": seconds,
        "rounds": rounds,
        "results": results,
    }


def write_reports(result: dict[str, Any], folder: Path = RESULTS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "protocols.json", folder / "protocols.md"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Protocols: /classify beside the Open Inference Protocol (REST JSON, REST binary, gRPC)",
        "",
        f"{result['machine']['cpu']}, onnxruntime {result['machine']['onnxruntime']} on the CPU; client and server "
        f"on the same 2-core machine; {result['image']} decoded by the server on every path; "
        f"{result['seconds_per_path']} s per path and concurrency, in {result['rounds']} interleaved rounds; "
        "random-init weights.",
        "",
        "| model | concurrency | path | img/s | vs /classify | p50 ms | p95 ms | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for model, by_concurrency in result["results"].items():
        for concurrency, rows in by_concurrency.items():
            base = rows["classify"]["images_per_s"]
            for path, r in rows.items():
                ratio = r["images_per_s"] / base if base else float("nan")
                lines.append(
                    f"| {model} | {concurrency} | {path} | {r['images_per_s']} | {ratio:.2f} | {r['p50_ms']} | "
                    f"{r['p95_ms']} | {r['errors']} |"
                )
    paths[1].write_text("\n".join(lines) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.concurrency, args.seconds, args.rounds)
    for path in write_reports(result, args.out):
        print(f"wrote {path}")
    print((args.out / "protocols.md").read_text())


if __name__ == "__main__":
    main()
