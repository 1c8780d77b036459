"""Detection benchmark: Focal-RetinaNet at the default 640x640 canvas, backend alone and through the service.

    python -m bench.detect [--variant focal_tiny] [--rounds 5] [--seconds 20]

1. Exports (or reuses) a random-init detection export and the classifier of the
   same variant (224x224), both fp32 for onnxruntime CPU.
2. Backend alone, interleaved rounds with medians: detector batch-1 latency and
   batch-2 (the profile's opt) throughput, next to the classifier's batch-1
   latency, so the detector's cost is also given as a ratio measured side by side.
3. Host work per image: letterbox decode+preprocess of a 640x480 JPEG, and NMS
   with all 5000 candidates above the threshold (random classes, and all in one).
4. Through the running service (`POST /detect?score_threshold=0`): latency at
   concurrency 1 and throughput at concurrency 4.

Results: bench/results/detect.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    cls_folder = Path("artifacts") / f"bench-{variant}-random-init-float"
    quiet = {"log": lambda _: None}
    det = run_export(
        ExportOptions(variant=variant, task="detect", random_init=True, out=det_folder, engine="skip"), **quiet
    )
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
    return {
        "model": f"{variant} RetinaNet, 640x640 canvas, random-init, onnxruntime CPU fp32",
        "machine": {"cpu": _cpu_name(), "onnxruntime": ort.__version__},
        "rounds": rounds,
        "backend": backend,
        "host": host,
        "service": service,
        "service_note": "client, server and onnxruntime share the machine's cores; image 640x480 JPEG",
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
    ]
    md_path.write_text("\n".join(lines))
    return [json_path, md_path]


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
