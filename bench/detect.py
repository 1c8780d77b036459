"""Detection benchmark: Focal-RetinaNet at one 640x640 canvas and with the 640 canvas set (buckets),
backend alone and through the service.

    python -m bench.detect [--variant focal_tiny] [--rounds 5] [--seconds 20]

1. Exports (or reuses) random-init detection exports, one canvas (640x640) and the 640 set
   (seven canvases: `export.canvases`), and the classifier of the same variant (224x224), all
   fp32 for onnxruntime CPU: export time (when not reused) and the artifacts' size.
2. Backend alone, interleaved rounds with medians: detector batch-1 latency and
   batch-2 (the profile's opt) throughput, next to the classifier's batch-1
   latency, so the detector's cost is also given as a ratio measured side by side.
3. Host work per image: letterbox decode+preprocess of a 640x480 JPEG, and NMS
   with all 5000 candidates above the threshold (random classes, and all in one).
4. Through the running service (`POST /detect?score_threshold=0`): latency at
   concurrency 1 and throughput at concurrency 4.
5. Buckets against the single canvas, for a mix of landscape, portrait and square photos:
   the canvas each photo goes to and the share of it that is padding; each canvas's
   batch-1 latency (backend alone, interleaved rounds) and so the backend time per photo
   of the mix; both services side by side (interleaved rounds of the mix at concurrency 2):
   img/s, warm-up time and resident memory.

Results: bench/results/detect.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.cpu_throughput import RESULTS, _cpu_name
from bench.load import _load, _percentile, sample_jpeg
from export.options import ExportOptions
from export.pipeline import run_export
from manifest import DetectManifest, Manifest
from service.images import decode
from service.launch import running_server
from service.tasks.detect import Letterbox, Letterboxed, postprocess


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run(variant: str, rounds: int, seconds: float) -> dict[str, Any]:
    canvas = (640, 640)
    det_folder = Path("artifacts") / f"bench-{variant}-detect-640x640-random-init"
    set_folder = Path("artifacts") / f"bench-{variant}-detect-canvases-640-random-init"
    cls_folder = Path("artifacts") / f"bench-{variant}-random-init-float"
    quiet = {"log": lambda _: None}
    det, single_export = _export(ExportOptions(variant, "detect", random_init=True, canvases=[canvas]), det_folder)
    buckets, set_export = _export(ExportOptions(variant, "detect", random_init=True, canvas_set="640"), set_folder)
    assert isinstance(det, DetectManifest)
    assert isinstance(buckets, DetectManifest)
    cls_options = ExportOptions(variant=variant, random_init=True, out=cls_folder, engine="skip", uint8_input=False)
    cls = run_export(cls_options, **quiet)  # float input, like the detector's
    assert det.task == "detect"
    det_session, cls_session = _session(det_folder / det.onnx_fp32), _session(cls_folder / cls.onnx_fp32)
    rng = np.random.default_rng(0)
    det_in = {b: rng.standard_normal((b, 3, *canvas), dtype=np.float32) for b in (1, 2)}
    cls_in = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
    det_session.run(None, {"pixels": det_in[2]})
    cls_session.run(None, {"pixels": cls_in})

    b1, b2, c1 = [], [], []
    for r in range(rounds):  # interleaved: a slow phase of the machine hits all three alike
        b1.append(_median_ms(lambda: det_session.run(None, {"pixels": det_in[1]}), 3))
        b2.append(_median_ms(lambda: det_session.run(None, {"pixels": det_in[2]}), 2))
        c1.append(_median_ms(lambda: cls_session.run(None, {"pixels": cls_in}), 5))
        print(f"round {r + 1}/{rounds}: detector b1 {b1[-1]:.0f} ms, b2 {b2[-1]:.0f} ms; classifier b1 {c1[-1]:.0f} ms")
    backend = {
        "detector_batch1_ms": round(statistics.median(b1), 1),
        "detector_batch2_images_per_s": round(2000 / statistics.median(b2), 2),
        "classifier_224_batch1_ms": round(statistics.median(c1), 1),
        "detector_over_classifier_latency": round(statistics.median(b1) / statistics.median(c1), 2),
    }

    body = sample_jpeg((640, 480))
    spec = Letterbox.from_manifest(det)
    letterbox_ms = _median_ms(lambda: spec.to_canvas(decode(body, 10**8, spec.draft_short_side)), 20)
    rows = np.asarray(det_session.run(None, {"pixels": det_in[1]})[0])[0].copy()
    # Random-init scores sit under the 0.05 threshold; give every candidate a score above it
    # and a random class, so all 5000 enter NMS (the most work it can get).
    rows[:, 4] = rng.uniform(0.06, 1.0, len(rows))
    rows[:, 5] = rng.integers(0, 80, len(rows))
    settings = det.detection.postprocess
    placed = Letterboxed(np.zeros(0), (640, 480), (640, 480), (1.0, 1.0))
    nms_ms = _median_ms(lambda: postprocess(rows, placed, settings, 0.0, 100), 20)
    one_class = rows.copy()
    one_class[:, 5] = 0  # every candidate in one class: each IoU pass covers all 5000
    one_ms = _median_ms(lambda: postprocess(one_class, placed, settings, 0.0, 100), 20)
    host = {
        "letterbox_decode_preprocess_ms": round(letterbox_ms, 1),
        "nms_5000_candidates_80_classes_ms": round(nms_ms, 1),
        "nms_5000_candidates_1_class_ms": round(one_ms, 1),
    }
    print(f"host: {host}")

    service = {}
    with running_server(det_folder, max_batch_size="2") as server:
        url = f"{server.url}/detect?score_threshold=0"
        asyncio.run(_load(url, body, 1, 2.0))
        for concurrency in (1, 4):
            result = asyncio.run(_load(url, body, concurrency, seconds))
            lat = result["latencies"]
            service[f"c{concurrency}"] = {
                "images_per_s": round(len(lat) / result["elapsed"], 2),
                "p50_ms": round(_percentile(lat, 50) * 1000, 1),
                "p95_ms": round(_percentile(lat, 95) * 1000, 1),
                "errors": result["errors"],
            }
            print(f"service concurrency {concurrency}: {service[f'c{concurrency}']}", flush=True)
    compared = _buckets_against_one_canvas(det, det_folder, buckets, set_folder, rounds, seconds)
    return {
        "model": f"{variant} RetinaNet, 640x640 canvas, random-init, onnxruntime CPU fp32",
        "machine": {"cpu": _cpu_name(), "onnxruntime": ort.__version__},
        "rounds": rounds,
        "backend": backend,
        "host": host,
        "service": service,
        "service_note": "client, server and onnxruntime share the machine's cores; image 640x480 JPEG",
        "exports": {"single_canvas": single_export, "canvas_set_640": set_export},
        "buckets": compared,
    }


def _export(opts: ExportOptions, out: Path) -> tuple[Manifest, dict[str, Any]]:
    """Export (or reuse) into `out`: the manifest, and its time and size."""
    opts.out, opts.engine = out, "skip"
    lines: list[str] = []
    start = time.perf_counter()
    manifest = run_export(opts, log=lines.append)
    took = time.perf_counter() - start
    reused = any("reusing" in line for line in lines)
    files = {name: (out / name).stat().st_size for name in manifest.onnx_names}
    # The export's own report of the sharing: "... X MiB there, Y MiB if each held its own".
    unshared = [re.search(r"([0-9.]+) MiB if each held its own", line) for line in lines]
    facts = {
        "canvases": [list(c) for c in (manifest.canvas_sizes if isinstance(manifest, DetectManifest) else [])],
        "export_s": None if reused else round(took, 1),
        "files_mb": round(sum(files.values()) / 2**20, 1),
        "weights_shared_in": manifest.onnx_data,
        "unshared_mib": next((float(m.group(1)) for m in unshared if m), None),
    }
    print(f"export {out.name}: {facts}", flush=True)
    return manifest, facts


# Landscape, portrait and square photos as phones and cameras take them (width, height).
PHOTO_MIX = [(1280, 960), (960, 1280), (1080, 1080), (1920, 1080), (1080, 1920), (1500, 1000), (1000, 1500)]


def _server_facts(server: Any) -> dict[str, Any]:
    import httpx

    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"][0]
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
    return {"warmup_s": round(model["warmup_seconds"], 1), "rss_mb": round(rss_kb / 1024)}


def _buckets_against_one_canvas(
    single: DetectManifest, single_folder: Path, buckets: DetectManifest, set_folder: Path, rounds: int, seconds: float
) -> dict[str, Any]:
    one, many = Letterbox.from_manifest(single), Letterbox.from_manifest(buckets)
    photos: list[dict[str, Any]] = []
    for width, height in PHOTO_MIX:
        (c1, r1), (c2, r2) = one.route(width, height), many.route(width, height)
        photos.append({
            "photo": f"{width}x{height}",
            "single": {"canvas": f"{c1[0]}x{c1[1]}", "padding": round(1 - r1[0] * r1[1] / (c1[0] * c1[1]), 3)},
            "buckets": {"canvas": f"{c2[0]}x{c2[1]}", "padding": round(1 - r2[0] * r2[1] / (c2[0] * c2[1]), 3)},
            "canvases": (c1, c2),
        })  # fmt: skip

    # Backend alone: every canvas's batch-1 latency, interleaved rounds, medians.
    views = {tuple(v.input_size): (set_folder / v.onnx_fp32) for v in buckets.canvas_views()}
    sessions = {size: _session(path) for size, path in views.items()}
    inputs = {size: np.zeros((1, 3, *size), np.float32) for size in sessions}
    for size, session in sessions.items():
        session.run(None, {"pixels": inputs[size]})
    latency: dict[tuple[int, int], list[float]] = {size: [] for size in sessions}
    for r in range(rounds):
        for size, session in sessions.items():
            latency[size].append(_median_ms(lambda s=session, x=inputs[size]: s.run(None, {"pixels": x}), 3))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{h}x{w} {v[-1]:.0f}" for (h, w), v in latency.items()))
    medians = {size: statistics.median(v) for size, v in latency.items()}
    del sessions
    full = medians[(640, 640)]
    per_photo = [medians[p["canvases"][1]] for p in photos]
    for p, ms in zip(photos, per_photo, strict=True):
        p["buckets"]["backend_ms"] = round(ms, 1)
        p["single"]["backend_ms"] = round(full, 1)
        del p["canvases"]

    # Both services, side by side: interleaved rounds of the mix.
    bodies = [sample_jpeg(size, seed=i) for i, size in enumerate(PHOTO_MIX)]
    served: dict[str, list[float]] = {"single": [], "buckets": []}
    with (
        running_server(single_folder, max_batch_size="2", grpc_port="0") as first,  # both at once: no gRPC port
        running_server(set_folder, startup_timeout_s=300.0, max_batch_size="2", grpc_port="0") as second,
    ):
        servers = {"single": first, "buckets": second}
        for server in servers.values():
            asyncio.run(_load(f"{server.url}/detect", bodies, 2, 2.0 * len(bodies)))
        for r in range(rounds):
            for name, server in servers.items():
                result = asyncio.run(_load(f"{server.url}/detect", bodies, 2, seconds))
                served[name].append(len(result["latencies"]) / result["elapsed"])
            print(
                f"round {r + 1}/{rounds}: img/s single {served['single'][-1]:.2f}, buckets {served['buckets'][-1]:.2f}"
            )
        facts = {name: _server_facts(server) for name, server in servers.items()}
    return {
        "photos": photos,
        "canvas_batch1_ms": {f"{h}x{w}": round(v, 1) for (h, w), v in medians.items()},
        "mean_padding": {k: round(statistics.mean(p[k]["padding"] for p in photos), 3) for k in ("single", "buckets")},
        "mean_canvas_pixels": {
            "single": 640 * 640,
            "buckets": round(
                statistics.mean(int(a) * int(b) for a, b in (p["buckets"]["canvas"].split("x") for p in photos))
            ),
        },
        "backend_ms_per_photo": {"single": round(full, 1), "buckets": round(statistics.mean(per_photo), 1)},
        "service_images_per_s": {k: round(statistics.median(v), 2) for k, v in served.items()},
        "service_rounds": {k: [round(x, 2) for x in v] for k, v in served.items()},
        "servers": facts,
        "note": "service: max batch 2, concurrency 2, the mix in turn; both servers run at once, loaded in turn",
    }


def write_reports(result: dict[str, Any], folder: Path = RESULTS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "detect.json", folder / "detect.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    b, h, s = result["backend"], result["host"], result["service"]
    lines = [
        "# Detection benchmark",
        "",
        f"{result['model']}; {result['machine']['cpu']}, onnxruntime {result['machine']['onnxruntime']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| detector batch 1 (backend) | {b['detector_batch1_ms']} ms |",
        f"| detector batch 2 throughput (backend) | {b['detector_batch2_images_per_s']} img/s |",
        f"| classifier 224 batch 1, same run | {b['classifier_224_batch1_ms']} ms |",
        f"| detector / classifier latency | {b['detector_over_classifier_latency']}x |",
        f"| letterbox decode + preprocess (640x480 JPEG) | {h['letterbox_decode_preprocess_ms']} ms |",
        f"| NMS, 5000 candidates above the threshold, 80 classes | {h['nms_5000_candidates_80_classes_ms']} ms |",
        f"| NMS, 5000 candidates above the threshold, 1 class | {h['nms_5000_candidates_1_class_ms']} ms |",
        *(
            f"| service, concurrency {c[1:]}: p50 / p95, throughput | {v['p50_ms']} / {v['p95_ms']} ms, "
            f"{v['images_per_s']} img/s |"
            for c, v in s.items()
        ),
        "",
        result["service_note"],
        "",
        *_bucket_lines(result),
    ]
    md_path.write_text("\n".join(lines))
    return [json_path, md_path]


def _bucket_lines(result: dict[str, Any]) -> list[str]:
    b, exports = result["buckets"], result["exports"]
    one, many = exports["single_canvas"], exports["canvas_set_640"]
    lines = [
        "## Canvas buckets (the 640 set) against one 640x640 canvas",
        "",
        "| | one canvas | 640 set |",
        "|---|---|---|",
        f"| canvases | 640x640 | {', '.join('x'.join(map(str, c)) for c in many['canvases'])} |",
        f"| export time (s; - reused) | {one['export_s'] or '-'} | {many['export_s'] or '-'} |",
        f"| artifacts (ONNX + shared weights) | {one['files_mb']} MiB | {many['files_mb']} MiB "
        f"({many['unshared_mib'] or '-'} MiB if each graph held its weights) |",
        f"| service warm-up (batch 1 and 2, every canvas) | {b['servers']['single']['warmup_s']} s | "
        f"{b['servers']['buckets']['warmup_s']} s |",
        f"| server resident memory after the load | {b['servers']['single']['rss_mb']} MiB | "
        f"{b['servers']['buckets']['rss_mb']} MiB |",
        f"| mean padding of the photo mix | {b['mean_padding']['single']:.1%} | {b['mean_padding']['buckets']:.1%} |",
        f"| mean canvas pixels per photo | {b['mean_canvas_pixels']['single']} | "
        f"{b['mean_canvas_pixels']['buckets']} |",
        f"| backend batch-1 ms per photo of the mix | {b['backend_ms_per_photo']['single']} | "
        f"{b['backend_ms_per_photo']['buckets']} |",
        f"| service img/s (median of rounds) | {b['service_images_per_s']['single']} | "
        f"{b['service_images_per_s']['buckets']} |",
        "",
        "| photo (w x h) | one canvas: padding | 640 set: canvas (h x w) | padding | batch-1 ms |",
        "|---|---|---|---|---|",
        *(
            f"| {p['photo']} | {p['single']['padding']:.1%} | {p['buckets']['canvas']} | "
            f"{p['buckets']['padding']:.1%} | {p['buckets']['backend_ms']} |"
            for p in b["photos"]
        ),
        "",
        "Batch-1 latency per canvas (ms): " + ", ".join(f"{k} {v}" for k, v in b["canvas_batch1_ms"].items()) + ".",
        f"Service rounds (img/s): one canvas {b['service_rounds']['single']}, "
        f"640 set {b['service_rounds']['buckets']}.",
        b["note"] + ".",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="focal_tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.variant, args.rounds, args.seconds)
    for path in write_reports(result, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
