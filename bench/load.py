"""Load benchmark: the running service against its own backend, measured in one run.

    python -m bench.load [--concurrency 1 2 4 8 16 32] [--seconds 10] [--soak-seconds 180]

1. Exports (or reuses) focal_tiny random-init and starts `python -m service` on it.
2. Measures the backend alone (onnxruntime, same threads): batch-1 latency and
   throughput at the service's max batch; and decode+preprocess time of the test image.
3. Sweeps client concurrency: img/s, p50/p95/p99 latency, and the average batch
   size read from /metrics (images / batches).
4. Soaks at the highest concurrency for --soak-seconds, sampling the server's
   resident memory every second.

Goals (issue 4): at saturation >= 90% of the backend's throughput at the same
batch size; at concurrency 1, p50 <= backend batch-1 latency + 5 ms + decode;
resident memory flat after warm-up. Results: bench/results/load.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from PIL import Image

from bench.cpu_throughput import RESULTS, _cpu_name
from export.options import ExportOptions
from export.pipeline import run_export
from manifest import Manifest
from service.images import decode
from service.launch import Server, running_server
from service.tasks.classify import CenterCrop

MAX_BATCH = 8


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _batch_counters(server: Server) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics").text
    images = re.search(r"^focal_batch_images_total\{[^}]*\} (\S+)", text, re.MULTILINE)
    batches = re.findall(r"^focal_batches_total\{[^}]*\} (\S+)", text, re.MULTILINE)
    return (float(images.group(1)) if images else 0.0), sum(float(b) for b in batches)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _load(
    url: str, body: bytes | list[bytes], concurrency: int, seconds: float, on_tick: Any = None
) -> dict[str, Any]:
    """`concurrency` clients posting `body` (or each the next of several bodies, in turn) for `seconds`."""
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    bodies = body if isinstance(body, list) else [body]

    async def worker(client: httpx.AsyncClient, first: int) -> None:
        nonlocal errors
        sent = first
        while time.monotonic() < end:
            start = time.perf_counter()
            data = bodies[sent % len(bodies)]
            sent += 1
            response = await client.post(url, content=data, headers={"Content-Type": "image/jpeg"})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    async def ticker() -> None:
        while time.monotonic() < end:
            on_tick()
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.monotonic()
        tasks = [worker(client, i) for i in range(concurrency)] + ([ticker()] if on_tick else [])
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


def sample_jpeg(size: tuple[int, int] = (640, 480), seed: int = 0) -> bytes:
    """A photo-like JPEG (colour gradients and noise): it decodes like a real photo of that size."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 255 + rng.normal(0, 20, (h, w, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _backend_baseline(folder: Path, manifest: Manifest, sample: np.ndarray, rounds: int = 7) -> dict[str, float]:
    session = ort.InferenceSession(str(folder / manifest.onnx_fp32), providers=["CPUExecutionProvider"])
    one, full = sample[None], np.repeat(sample[None], MAX_BATCH, axis=0)
    session.run(None, {"pixels": full})
    b1, bmax = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, {"pixels": one})
        b1.append(time.perf_counter() - start)
        start = time.perf_counter()
        session.run(None, {"pixels": full})
        bmax.append(time.perf_counter() - start)
    return {
        "batch1_latency_ms": statistics.median(b1) * 1000,
        "max_batch_images_per_s": MAX_BATCH / statistics.median(bmax),
    }


def run(concurrencies: list[int], seconds: float, soak_seconds: float) -> dict[str, Any]:
    folder = Path("artifacts") / "bench-focal_tiny-random-init"
    manifest = run_export(
        ExportOptions(variant="focal_tiny", random_init=True, out=folder, engine="skip"), log=lambda _: None
    )
    body = sample_jpeg((640, 480))
    assert manifest.task == "classify"
    spec = CenterCrop.from_manifest(manifest.preprocess)
    decode_times = []
    for _ in range(20):
        start = time.perf_counter()
        sample = spec.to_canvas(decode(body, 10**8, draft_short_side=spec.draft_short_side)).pixels
        decode_times.append(time.perf_counter() - start)
    decode_ms = statistics.median(decode_times) * 1000
    baseline = _backend_baseline(folder, manifest, sample)

    sweep = []
    rss: list[tuple[float, float]] = []
    with running_server(folder, max_batch_size=str(MAX_BATCH), max_queue_size="1024") as server:
        url = f"{server.url}/classify"
        asyncio.run(_load(url, body, 2, 2.0))  # warm the connection pool and caches
        for c in concurrencies:
            images0, batches0 = _batch_counters(server)
            result = asyncio.run(_load(url, body, c, seconds))
            images1, batches1 = _batch_counters(server)
            lat = result["latencies"]
            sweep.append(
                {
                    "concurrency": c,
                    "images_per_s": round(len(lat) / result["elapsed"], 2),
                    "p50_ms": round(_percentile(lat, 50) * 1000, 1),
                    "p95_ms": round(_percentile(lat, 95) * 1000, 1),
                    "p99_ms": round(_percentile(lat, 99) * 1000, 1),
                    "avg_batch_size": round((images1 - images0) / max(batches1 - batches0, 1), 2),
                    "errors": result["errors"],
                }
            )
            print(f"concurrency {c}: {sweep[-1]}", flush=True)
        if soak_seconds > 0:
            pid, start = server.process.pid, time.monotonic()
            soak = asyncio.run(
                _load(
                    url,
                    body,
                    max(concurrencies),
                    soak_seconds,
                    on_tick=lambda: rss.append((round(time.monotonic() - start, 1), round(_rss_mb(pid), 1))),
                )
            )
            print(f"soak: {len(soak['latencies'])} requests, {soak['errors']} errors", flush=True)

    saturated = max(sweep, key=lambda r: r["images_per_s"])
    c1 = next((r for r in sweep if r["concurrency"] == 1), None)
    raw = baseline["max_batch_images_per_s"]
    memory = _memory_summary(rss)
    return {
        "model": "focal_tiny 224 random-init, onnxruntime CPU",
        "machine": {"cpu": _cpu_name(), "onnxruntime": ort.__version__},
        "image": "640x480 JPEG",
        "decode_preprocess_ms": round(decode_ms, 1),
        "backend": {k: round(v, 2) for k, v in baseline.items()},
        "max_batch_size": MAX_BATCH,
        "seconds_per_level": seconds,
        "sweep": sweep,
        "goals": {
            "saturation_fraction_of_backend": round(saturated["images_per_s"] / raw, 3),
            "saturation_goal": 0.9,
            "c1_p50_ms": c1["p50_ms"] if c1 else None,
            "c1_p50_budget_ms": round(baseline["batch1_latency_ms"] + 5 + decode_ms, 1),
        },
        "memory": memory,
        "rss_samples_mb": rss,
    }


def _memory_summary(rss: list[tuple[float, float]]) -> dict[str, Any]:
    if len(rss) < 10:
        return {"samples": len(rss)}
    values = [v for _, v in rss]
    warm = values[len(values) // 10 :]  # after the first tenth (warm-up)
    times = np.asarray([t for t, _ in rss][len(values) // 10 :])
    slope_per_min = float(np.polyfit(times, np.asarray(warm), 1)[0] * 60)
    return {
        "samples": len(rss),
        "after_warmup_mb": warm[0],
        "end_mb": values[-1],
        "max_mb": max(values),
        "slope_mb_per_min": round(slope_per_min, 3),
    }


def write_reports(result: dict[str, Any], folder: Path = RESULTS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "load.json", folder / "load.md", folder / "load.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    g, b, m = result["goals"], result["backend"], result["memory"]
    lines = [
        f"# Load: {result['model']}",
        "",
        f"{result['machine']['cpu']}; client and server on the same 2-core machine; {result['image']} "
        f"(decode + preprocess {result['decode_preprocess_ms']} ms); max batch {result['max_batch_size']}; "
        f"{result['seconds_per_level']} s per level.",
        "",
        f"Backend alone (onnxruntime, same process settings): batch-1 latency {b['batch1_latency_ms']} ms, "
        f"batch-{result['max_batch_size']} throughput {b['max_batch_images_per_s']} img/s.",
        "",
        "| concurrency | img/s | p50 ms | p95 ms | p99 ms | avg batch | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["sweep"]:
        lines.append(
            f"| {r['concurrency']} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
            f"{r['avg_batch_size']} | {r['errors']} |"
        )
    lines += [
        "",
        f"- Saturation: {g['saturation_fraction_of_backend']:.0%} of the backend's batch-{result['max_batch_size']} "
        f"throughput (goal {g['saturation_goal']:.0%}).",
        f"- Concurrency 1: p50 {g['c1_p50_ms']} ms "
        f"(budget: backend batch-1 + 5 ms + decode = {g['c1_p50_budget_ms']} ms).",
    ]
    if "slope_mb_per_min" in m:
        lines.append(
            f"- Resident memory over {m['samples']} s at saturation: {m['after_warmup_mb']} MB after warm-up, "
            f"{m['end_mb']} MB at the end, max {m['max_mb']} MB, trend {m['slope_mb_per_min']} MB/min."
        )
    paths[1].write_text("\n".join(lines) + "\n")
    _plot(result, paths[2])
    return paths


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    cs = [r["concurrency"] for r in sweep]
    axes[0].plot(cs, [r["images_per_s"] for r in sweep], marker="o", label="service")
    raw = result["backend"]["max_batch_images_per_s"]
    axes[0].axhline(raw, color="black", linestyle="--", linewidth=1, label="backend alone")
    axes[0].set(xscale="log", xlabel="concurrency", ylabel="img/s", title="throughput")
    axes[0].legend(fontsize=8)
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        axes[1].plot(cs, [r[key] for r in sweep], marker="o", label=key[:3])
    axes[1].set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="latency")
    axes[1].legend(fontsize=8)
    if result["rss_samples_mb"]:
        t, v = zip(*result["rss_samples_mb"], strict=True)
        axes[2].plot(t, v)
    axes[2].set(xlabel="seconds at saturation", ylabel="MB", title="server resident memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--soak-seconds", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.concurrency, args.seconds, args.soak_seconds)
    for path in write_reports(result, args.out):
        print(f"wrote {path}")
    print((args.out / "load.md").read_text())


if __name__ == "__main__":
    main()
