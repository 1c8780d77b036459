"""Host path: what the server spends per image besides the model, and how much of it is serialised.

    python -m bench.host_path [--concurrency 16] [--seconds 15] [--rounds 3] [--out bench/results]

With a micro Focal (an export whose model costs almost nothing, so the host path is
what shows), a 1280x960 JPEG posted to /classify:

1. decode + preprocess of that image in a tight loop, one thread: the work no server
   can avoid (Pillow draft decode, resize, crop, normalise);
2. the model alone (onnxruntime, one thread) at the batch size the server formed;
3. the server under saturating load (`python -m service`, FOCAL_INTRA_OP_THREADS=1
   so that model CPU time is work; again with onnxruntime's default thread pool,
   whose spinning threads also burn CPU; and once more with that pool and spinning
   off, FOCAL_INTRA_OP_SPINNING=false): its process CPU time per image, all
   threads counted, minus the model's, and the part spent on the main thread, where
   the event loop runs (request parsing, response building, batching: the part one
   process serialises);
4. served images/s and the average batch size at the engine (from /metrics).

The load generator runs in this process on the same machine: on 2 cores it competes
with the server, so images/s is a floor; the CPU-ms per image are the server's own.
This is the one-process baseline for issue 13's multi-process front end (FOCAL_WORKERS,
not built yet). Results: bench/results/host_path.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.cpu_throughput import RESULTS, _cpu_name
from bench.load import _batch_counters, _load, sample_jpeg
from export.options import ExportOptions
from export.pipeline import run_export
from manifest import Manifest
from service.images import decode
from service.launch import running_server
from service.tasks.classify import CenterCrop

# A near-free Focal: widths 8..64, one or two blocks per stage (the golden fixtures' micro model).
MICRO = {"embed_dim": 8, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}
IMAGE_SIZE = (1280, 960)
MAX_BATCH = 8
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    """utime + stime of a process (all its threads) or of one of its threads."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _tight_loop_ms(fn: Any, seconds: float = 3.0) -> float:
    """CPU-ms per call of `fn` in this thread, over about `seconds`."""
    fn()
    calls, start, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.thread_time() - cpu) / calls * 1000


def _model_ms_per_image(folder: Path, manifest: Manifest, sample: np.ndarray, batch: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(folder / manifest.onnx_fp32), options, providers=["CPUExecutionProvider"])
    feed = {"pixels": np.repeat(sample[None], batch, axis=0)}
    return _tight_loop_ms(lambda: session.run(None, feed)) / batch


def _serve(
    folder: Path, body: bytes, concurrency: int, seconds: float, threads: int, spinning: bool = True
) -> dict[str, Any]:
    with running_server(
        folder,
        max_batch_size=str(MAX_BATCH),
        max_queue_size="1024",
        intra_op_threads=str(threads),
        intra_op_spinning=str(spinning).lower(),
    ) as server:
        url = f"{server.url}/classify"
        pid = server.process.pid
        asyncio.run(_load(url, body, concurrency, 3.0))  # warm-up: pools, caches, the first batches
        images0, batches0 = _batch_counters(server)
        cpu0, loop0 = _cpu_seconds(pid), _cpu_seconds(pid, pid)
        result = asyncio.run(_load(url, body, concurrency, seconds))
        cpu1, loop1 = _cpu_seconds(pid), _cpu_seconds(pid, pid)
        images1, batches1 = _batch_counters(server)
    images = images1 - images0
    return {
        "intra_op_threads": (str(threads) if threads else "one per core") + ("" if spinning else ", no spinning"),
        "images": int(images),
        "errors": result["errors"],
        "images_per_s": round(len(result["latencies"]) / result["elapsed"], 1),
        "avg_batch_size": round(images / max(batches1 - batches0, 1), 2),
        "server_cpu_ms_per_image": (cpu1 - cpu0) / images * 1000,
        "event_loop_cpu_ms_per_image": (loop1 - loop0) / images * 1000,
    }


def run(concurrency: int, seconds: float, rounds: int) -> dict[str, Any]:
    folder = Path("artifacts") / "bench-host-path-micro"
    manifest = run_export(
        ExportOptions(
            variant="focal_tiny", random_init=True, model_kwargs=MICRO, max_batch=MAX_BATCH, out=folder, engine="skip"
        ),
        log=lambda _: None,
    )
    assert manifest.task == "classify"
    body = sample_jpeg(IMAGE_SIZE)
    spec = CenterCrop.from_manifest(manifest.preprocess)

    def preprocess() -> np.ndarray:
        return spec.to_canvas(decode(body, 10**8, draft_short_side=spec.draft_short_side)).pixels

    sample = preprocess()
    configs = {"1": (1, True), "default": (0, True), "default, no spinning": (0, False)}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in configs}
    decode_ms: list[float] = []
    for _ in range(rounds):  # interleaved, medians: the machine is shared
        decode_ms.append(_tight_loop_ms(preprocess))
        for key, (threads, spinning) in configs.items():
            runs[key].append(_serve(folder, body, concurrency, seconds, threads, spinning))
        print(f"round: decode {decode_ms[-1]:.2f} ms, {[r[-1] for r in runs.values()]}", flush=True)

    rows = []
    for samples in runs.values():
        avg_batch = statistics.median(r["avg_batch_size"] for r in samples)
        model_ms = _model_ms_per_image(folder, manifest, sample, max(1, round(avg_batch)))
        total = statistics.median(r["server_cpu_ms_per_image"] for r in samples)
        rows.append(
            {
                "workers": 1,
                "intra_op_threads": samples[0]["intra_op_threads"],
                "images_per_s": statistics.median(r["images_per_s"] for r in samples),
                "avg_batch_size": avg_batch,
                "server_cpu_ms_per_image": round(total, 2),
                "model_cpu_ms_per_image": round(model_ms, 2),
                "besides_model_cpu_ms_per_image": round(total - model_ms, 2),
                "event_loop_cpu_ms_per_image": round(
                    statistics.median(r["event_loop_cpu_ms_per_image"] for r in samples), 2
                ),
                "errors": sum(r["errors"] for r in samples),
                "samples": samples,
            }
        )
    return {
        "model": f"micro Focal {MICRO}, random-init, onnxruntime CPU fp32",
        "image": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG, posted raw to /classify",
        "concurrency": concurrency,
        "seconds": seconds,
        "rounds": rounds,
        "decode_preprocess_cpu_ms": round(statistics.median(decode_ms), 2),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "onnxruntime": ort.__version__},
        "results": rows,
    }


def write_reports(result: dict[str, Any], folder: Path = RESULTS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "host_path.json", folder / "host_path.md"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Host path: server CPU per image besides the model",
        "",
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores; {result['model']}; {result['image']}; "
        f"{result['concurrency']} concurrent clients (in the bench process, on the same cores) for "
        f"{result['seconds']} s; medians of {result['rounds']} interleaved rounds.",
        "",
        f"Decode + preprocess of the image in a tight loop, one thread: **{result['decode_preprocess_cpu_ms']} "
        "CPU-ms per image** (the floor).",
        "",
        "| workers | onnxruntime threads | images/s | avg batch | server CPU-ms/image | model | besides the model "
        "| on the event loop |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['workers']} | {r['intra_op_threads']} | {r['images_per_s']} | {r['avg_batch_size']} | "
            f"{r['server_cpu_ms_per_image']} | {r['model_cpu_ms_per_image']} | "
            f"**{r['besides_model_cpu_ms_per_image']}** | **{r['event_loop_cpu_ms_per_image']}** |"
        )
    lines += [
        "",
        "- *server CPU-ms/image*: the server process's CPU time (every thread, onnxruntime's included) over "
        "the images it ran; *model*: the same model alone at the server's average batch, one thread; "
        "*on the event loop*: the main thread's share, which one process cannot spread over cores. With "
        "onnxruntime's default pool, its threads' spinning is in *besides the model*: that is real CPU the host "
        "path could have used.",
        "- Multi-process front end (`FOCAL_WORKERS`): not built yet, so only one worker is measured.",
    ]
    paths[1].write_text("\n".join(lines) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.concurrency, args.seconds, args.rounds)
    for path in write_reports(result, args.out):
        print(f"wrote {path}")
    print(args.out.joinpath("host_path.md").read_text())


if __name__ == "__main__":
    main()
