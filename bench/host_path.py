"""Host path: what the server spends per image besides the model, and how much of it is serialised.

    python -m bench.host_path [--concurrency 16] [--seconds 15] [--rounds 3] [--workers 1 2] [--out bench/results]

With a micro Focal (an export whose model costs almost nothing, so the host path is
what shows), a 1280x960 JPEG posted to /classify:

1. decode + preprocess of that image in a tight loop, one thread: the work no server
   can avoid (Pillow draft decode, resize, crop, normalise);
2. the model alone (onnxruntime, one thread) at the batch size the server formed;
3. the server under saturating load (`python -m service`, FOCAL_INTRA_OP_THREADS=1 so
   that model CPU time is work), with one process (FOCAL_WORKERS=1) and with two front
   ends and the model host (FOCAL_WORKERS=2), each at the GPU's default queue delay
   (5 ms) and the CPU's (0): the CPU time of every server process, all threads counted,
   minus the model's; the part spent on the front ends' main threads, where their event
   loops run (request parsing, response building: the part one process serialises);
   and the model host's main thread;
4. served images/s, the average batch size at the engine and the front ends per batch
   (from /metrics), and the server's memory;
5. the crossing alone: CPU per sample of a front end's messages to an echo host, for a
   float32 and a uint8 224x224 sample.

The load generator runs in this process on the same machine: on 2 cores it competes
with the server, so images/s is a floor; the CPU-ms per image are the server's own.
The configurations run interleaved, in rounds. Results: bench/results/host_path.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from bench.cpu_throughput import RESULTS, _cpu_name
from bench.load import _batch_counters, _load, _rss_mb, sample_jpeg
from export.options import ExportOptions
from export.pipeline import run_export
from manifest import Manifest
from service.images import decode
from service.ipc import read_message, write_message
from service.launch import running_server
from service.remote import HostLink
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


def _tree(pid: int) -> list[int]:
    """A process and all its descendants (the supervisor, the model host and the front ends)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _server_cpu(pids: list[int], loops: list[int]) -> tuple[float, float]:
    """(CPU seconds of every process, of the event-loop threads in `loops`), skipping processes gone."""
    total = loop = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += _cpu_seconds(pid)
            if pid in loops:
                loop += _cpu_seconds(pid, pid)
    return total, loop


def _pid_logged(logs: str, message: str) -> int:
    for line in logs.splitlines():
        if message in line:
            return int(json.loads(line)["pid"])
    raise RuntimeError(f"no {message!r} in the server's log")


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
    folder: Path, body: bytes, concurrency: int, seconds: float, workers: int, delay_ms: float, threads: int = 1
) -> dict[str, Any]:
    with running_server(
        folder,
        workers=str(workers),
        max_queue_delay_ms=str(delay_ms),
        max_batch_size=str(MAX_BATCH),
        max_queue_size="1024",
        intra_op_threads=str(threads),
    ) as server:
        url = f"{server.url}/classify"
        asyncio.run(_load(url, body, concurrency, 3.0))  # warm-up: pools, caches, the first batches
        pids = _tree(server.process.pid)
        if workers == 1:
            front_ends, host = [server.process.pid], server.process.pid
        else:
            host = _pid_logged(server.logs(), "started the model host")
            front_ends = [pid for pid in pids if pid not in (host, server.process.pid) and _is_front_end(pid)]
            assert len(front_ends) == workers, (pids, host, front_ends)
        rss_mb = sum(_rss_mb(pid) for pid in pids)
        images0, batches0 = _batch_counters(server)
        sources0 = _front_ends_per_batch(server)
        cpu0, loops0 = _server_cpu(pids, front_ends)
        host_loop0 = _cpu_seconds(host, host)
        result = asyncio.run(_load(url, body, concurrency, seconds))
        cpu1, loops1 = _server_cpu(pids, front_ends)
        host_loop1 = _cpu_seconds(host, host)
        images1, batches1 = _batch_counters(server)
        sources1 = _front_ends_per_batch(server)
    images, batches = images1 - images0, max(batches1 - batches0, 1)
    return {
        "workers": workers,
        "max_queue_delay_ms": delay_ms,
        "intra_op_threads": str(threads) if threads else "one per core",
        "images": int(images),
        "errors": result["errors"],
        "images_per_s": round(len(result["latencies"]) / result["elapsed"], 1),
        "p50_ms": round(float(np.percentile(result["latencies"], 50)) * 1000, 1),
        "p95_ms": round(float(np.percentile(result["latencies"], 95)) * 1000, 1),
        "avg_batch_size": round(images / batches, 2),
        "front_ends_per_batch": round((sources1 - sources0) / batches, 2),
        "server_cpu_ms_per_image": (cpu1 - cpu0) / images * 1000,
        # every front end's event loop, over all images: each front end's own is this / workers
        "event_loop_cpu_ms_per_image": (loops1 - loops0) / images * 1000,
        "host_event_loop_cpu_ms_per_image": (host_loop1 - host_loop0) / images * 1000 if workers > 1 else None,
        "server_rss_mb": round(rss_mb),
    }


# A preprocessed 224x224 sample as float32 (a float-input export's), as uint8 (a classifier's default), and a small one.
SAMPLES = {"float32 3x224x224": 3 * 224 * 224 * 4, "uint8 3x224x224": 3 * 224 * 224, "tiny": 3 * 32 * 32}


def _crossing_ms(nbytes: int, count: int = 2000, concurrency: int = 16) -> float:
    """CPU-ms per sample of the messages alone: a front end's HostLink sending `nbytes` samples to an
    echo host that answers each with a 4 KB row (`service.ipc`, the model host's own framing)."""

    async def measure() -> float:
        row = np.zeros(1000, np.float32)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    header, _ = await read_message(reader)
                    if header.get("op") == "infer":
                        write_message(writer, {"id": header["id"]}, row)

        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "echo.sock")
            server = await asyncio.start_unix_server(answer, path=path)
            link = HostLink(path)
            await link.connect()
            sample = np.zeros(nbytes, np.uint8)

            async def sender(n: int) -> None:
                for _ in range(n):
                    await link.start({"op": "infer"}, sample)[1]

            await sender(100)
            cpu = time.process_time()
            await asyncio.gather(*(sender(count // concurrency) for _ in range(concurrency)))
            spent = time.process_time() - cpu
            await link.close()
            server.close()
        return spent / count * 1000

    return asyncio.run(measure())


def _is_front_end(pid: int) -> bool:
    """A spawned Python worker (not multiprocessing's resource tracker)."""
    with contextlib.suppress(OSError):
        return "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()
    return False


def _front_ends_per_batch(server: Any) -> float:
    found = re.search(r"^focal_batch_front_ends_sum\{[^}]*\} (\S+)", httpx.get(f"{server.url}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def run(concurrency: int, seconds: float, rounds: int, workers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
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
    # (workers, queue delay): 5 ms is the GPU default (batches form within a window, as they must to feed
    # a GPU), 0 the CPU default (a batch runs as soon as one image waits). One onnxruntime thread, so
    # that model CPU time is work.
    configs = {f"{n} workers, {delay:g} ms": (n, delay) for delay in (5.0, 0.0) for n in workers}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in configs}
    decode_ms: list[float] = []
    for _ in range(rounds):  # interleaved, medians: the machine is shared
        decode_ms.append(_tight_loop_ms(preprocess))
        for key, (count, delay_ms) in configs.items():
            runs[key].append(_serve(folder, body, concurrency, seconds, count, delay_ms))
        print(f"round: decode {decode_ms[-1]:.2f} ms, {[r[-1] for r in runs.values()]}", flush=True)
    crossing = {f"{name} ({nbytes // 1024} KiB)": round(_crossing_ms(nbytes), 3) for name, nbytes in SAMPLES.items()}
    print(f"crossing: {crossing}", flush=True)

    rows = []
    for samples in runs.values():
        avg_batch = statistics.median(r["avg_batch_size"] for r in samples)
        model_ms = _model_ms_per_image(folder, manifest, sample, max(1, round(avg_batch)))
        total = statistics.median(r["server_cpu_ms_per_image"] for r in samples)
        host_loop = [r["host_event_loop_cpu_ms_per_image"] for r in samples if r["host_event_loop_cpu_ms_per_image"]]
        rows.append(
            {
                "workers": samples[0]["workers"],
                "max_queue_delay_ms": samples[0]["max_queue_delay_ms"],
                "intra_op_threads": samples[0]["intra_op_threads"],
                "images_per_s": statistics.median(r["images_per_s"] for r in samples),
                "avg_batch_size": avg_batch,
                "p50_ms": statistics.median(r["p50_ms"] for r in samples),
                "p95_ms": statistics.median(r["p95_ms"] for r in samples),
                "front_ends_per_batch": statistics.median(r["front_ends_per_batch"] for r in samples),
                "server_cpu_ms_per_image": round(total, 2),
                "model_cpu_ms_per_image": round(model_ms, 2),
                "besides_model_cpu_ms_per_image": round(total - model_ms, 2),
                "event_loop_cpu_ms_per_image": round(
                    statistics.median(r["event_loop_cpu_ms_per_image"] for r in samples), 2
                ),
                "host_event_loop_cpu_ms_per_image": round(statistics.median(host_loop), 2) if host_loop else None,
                "server_rss_mb": statistics.median(r["server_rss_mb"] for r in samples),
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
        "crossing_cpu_ms_per_sample": crossing,
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
        "| workers | queue delay (ms) | images/s | p50 / p95 ms | avg batch | front ends per batch "
        "| server CPU-ms/image | model | besides the model | front ends' event loops | model host's event loop "
        "| server RSS (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        host_loop = "-" if r["host_event_loop_cpu_ms_per_image"] is None else r["host_event_loop_cpu_ms_per_image"]
        lines.append(
            f"| {r['workers']} | {r['max_queue_delay_ms']:g} | {r['images_per_s']} | {r['p50_ms']} / {r['p95_ms']} | "
            f"{r['avg_batch_size']} | "
            f"{r['front_ends_per_batch']} | {r['server_cpu_ms_per_image']} | {r['model_cpu_ms_per_image']} | "
            f"**{r['besides_model_cpu_ms_per_image']}** | **{r['event_loop_cpu_ms_per_image']}** | {host_loop} | "
            f"{r['server_rss_mb']} |"
        )
    lines += [
        "",
        "- *server CPU-ms/image*: the CPU time of every server process (supervisor, model host, front ends; "
        "every thread, onnxruntime's included) over the images run; *model*: the same model alone at the "
        "server's average batch, one thread; *besides the model*: the difference.",
        "- *front ends' event loops*: the main threads of the front-end processes, summed, per image: the "
        "serialised part. With N front ends each carries 1/N of it, so one process caps at 1000 / (this / N) "
        "images/s. *model host's event loop*: its main thread (receiving samples, answering rows), per image; "
        "the batches themselves run on another thread.",
        "- *front ends per batch*: the mean number of front-end processes whose images one batch held (1.0 "
        "with one worker).",
        "- One onnxruntime thread (FOCAL_INTRA_OP_THREADS=1) everywhere, so that the model's CPU time is work "
        "(its default pool's spinning threads would count in *besides the model*: see FOCAL_INTRA_OP_SPINNING).",
        "",
        "Crossing from a front end to the model host, per sample, both ends' CPU (a sample sent, a 4 KB row "
        "back; `service.ipc` over a Unix socket, in one process, no model): "
        + ", ".join(f"{k}: **{v} ms**" for k, v in result["crossing_cpu_ms_per_sample"].items())
        + ".",
    ]
    paths[1].write_text("\n".join(lines) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="FOCAL_WORKERS values to compare (default: 1 2)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.concurrency, args.seconds, args.rounds, tuple(args.workers))
    for path in write_reports(result, args.out):
        print(f"wrote {path}")
    print(args.out.joinpath("host_path.md").read_text())


if __name__ == "__main__":
    main()
