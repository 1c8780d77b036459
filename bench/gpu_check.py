"""The GPU check: one command that answers whether the TensorRT path works on this machine, and how well.

    make gpu-check            (bench/gpu_check.sh: its own environment with the `gpu` extra, then this)
    python -m bench.gpu_check [--seconds 60] [--out bench/results/gpu_check.md]

1. Preflight: TensorRT 10.4+ importable and a CUDA GPU visible (`export.tensorrt_engine.probe`);
   otherwise it stops at once with one line saying why and exit status 2. Nothing is skipped quietly.
2. Exports a Focal-T classifier (224) and a Focal-T RetinaNet (640x640), random-init, fp16, and
   builds each engine (`--engine required`), timing the export and the build apart.
3. Runs the TensorRT-marked tests (`pytest -m tensorrt`): every one must pass, none may skip.
4. Parity per output: the engine against ONNX Runtime on the same inputs, at batch 1 and the
   profile's max (max |difference| and that relative to the output's scale).
5. Serves each engine (`python -m service --backend tensorrt`) and drives `/classify` or `/detect`
   with a 640x480 JPEG for `--seconds` in all, split over concurrency 1, 8 and the max batch:
   img/s, p50/p95 and the server's host CPU per image.

Everything goes into one Markdown report (and a JSON beside it). Exit status 1 when a step failed
(the report says which), 0 when all passed. Meant for a single modern GPU: about ten minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# No import here that needs onnxruntime, torch or TensorRT: the preflight must be able to say what is
# missing in one line.
RESULTS = Path(__file__).resolve().parent / "results"  # bench.cpu_throughput's, which imports torch
WORK = Path("artifacts") / "gpu-check"
PARITY_LIMIT = 1e-2  # relative to the output's scale: the export's own fp16 bound
MODELS = {
    "classify": {"variant": "focal_tiny", "task": "classify", "route": "/classify"},
    "detect": {"variant": "focal_tiny", "task": "detect", "route": "/detect"},
}


def preflight() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    from export import tensorrt_engine

    probe = tensorrt_engine.probe()
    if not probe.available:
        return probe.reason or "TensorRT is not usable here"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime (or onnxruntime-gpu) is not installed: parity needs it"
    return None


def _export(task: str, out: Path) -> dict[str, Any]:
    from export.engine import ensure_engine
    from export.options import ExportOptions
    from export.pipeline import run_export

    start = time.perf_counter()
    manifest = run_export(
        ExportOptions(
            variant="focal_tiny",
            task=task,
            random_init=True,
            fp16=True,
            engine="skip",
            out=out,
            canvases=[(640, 640)] if task == "detect" else None,  # one engine's parity; canvases are its copies
        ),
        log=lambda line: print(f"  {line}", flush=True),
    )
    exported = time.perf_counter() - start
    start = time.perf_counter()
    ensure_engine(out, manifest, "required", log=lambda line: print(f"  {line}", flush=True))
    built = time.perf_counter() - start
    manifest.write(out)
    assert manifest.engine is not None
    return {
        "export_s": round(exported, 1),
        "engine_build_s": round(built, 1),
        "engine_mb": round((out / manifest.engine.path).stat().st_size / 2**20, 1),
        "tensorrt": manifest.engine.tensorrt_version,
        "gpu": manifest.engine.gpu_name,
        "compute_capability": manifest.engine.compute_capability,
        "strongly_typed": manifest.engine.strongly_typed,
        "tf32": manifest.engine.tf32,
    }


def _parity(out: Path) -> list[dict[str, Any]]:
    """The engine against ONNX Runtime on the same inputs, at batch 1 and the max. A classifier's logits
    elementwise, relative to their scale; a detector's rows as the export's fp16 check compares them
    (scores elementwise, candidates as sets per level: near-tied scores may swap rows). A row with
    `ok` false fails the check."""
    from manifest import read_manifest
    from service.backends.onnxruntime_backend import OnnxRuntimeBackend
    from service.backends.tensorrt_backend import TensorRTBackend

    manifest = read_manifest(out)
    engine, reference = TensorRTBackend(out, manifest), OnnxRuntimeBackend(out, manifest)
    rows = []
    try:
        rng = np.random.default_rng(0)
        for batch in sorted({1, manifest.batch.max}):
            shape = (batch, *manifest.input.sample_shape)
            if manifest.input.dtype == "uint8":  # pixels, normalised by the graph
                inputs = rng.integers(0, 256, shape, dtype=np.uint8)
            else:
                inputs = rng.standard_normal(shape).astype(np.float32)
            got, want = engine.infer(inputs).astype(np.float64), reference.infer(inputs).astype(np.float64)
            row: dict[str, Any] = {
                "output": manifest.output.name,
                "batch": batch,
                "reference": f"onnxruntime {reference.device} {reference.precision}",
            }
            if manifest.task == "detect":
                from export.tasks.detect import compare_selections

                levels = [level.candidates for level in manifest.detection.levels]
                box_px = 1e-2 * max(manifest.input_size)
                score_diff, agreement = compare_selections({batch: want}, {batch: got}, levels, box_px)
                row |= {"measure": "candidate scores max abs", "value": score_diff, "agreement": agreement}
                row["ok"] = bool(np.isfinite(got).all()) and score_diff <= PARITY_LIMIT
            else:
                diff = float(np.abs(got - want).max())
                relative = diff / (float(np.abs(want).max()) or 1.0)
                row |= {"measure": "max abs / scale", "value": relative, "agreement": None}
                row["ok"] = bool(np.isfinite(got).all()) and relative <= PARITY_LIMIT
            rows.append(row)
    finally:
        engine.close()
        reference.close()
    return rows


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve_and_load(out: Path, route: str, seconds: float) -> list[dict[str, Any]]:
    """Client concurrency 1, 8 and the max batch; the batches the server formed are read from /metrics."""
    from bench.load import _batch_counters, _load, _percentile, sample_jpeg
    from manifest import read_manifest
    from service.launch import running_server

    top = read_manifest(out).batch.max
    levels = sorted({1, 8, top})
    body = sample_jpeg((640, 480))
    rows = []
    with running_server(out, startup_timeout_s=180, backend="tensorrt", max_queue_size="1024") as server:
        asyncio.run(_load(f"{server.url}{route}", body, 2, 2.0))  # warm connections
        for concurrency in levels:
            cpu, (images0, batches0) = _cpu_seconds(server.process.pid), _batch_counters(server)
            try:
                result = asyncio.run(_load(f"{server.url}{route}", body, concurrency, seconds / len(levels)))
            except Exception as exc:  # keep the levels measured so far
                rows.append({"concurrency": concurrency, "error": f"{type(exc).__name__}: {exc}", "errors": 1})
                continue
            cpu = _cpu_seconds(server.process.pid) - cpu
            images1, batches1 = _batch_counters(server)
            lat, done = result["latencies"], max(len(result["latencies"]), 1)
            rows.append(
                {
                    "concurrency": concurrency,
                    "avg_batch": round((images1 - images0) / max(batches1 - batches0, 1), 2),
                    "images_per_s": round(len(lat) / result["elapsed"], 1),
                    "p50_ms": round(_percentile(lat, 50) * 1000, 1),
                    "p95_ms": round(_percentile(lat, 95) * 1000, 1),
                    "host_cpu_ms_per_image": round(cpu / done * 1000, 2),
                    "errors": result["errors"] + (0 if lat else 1),
                }
            )
            print(f"  {route} concurrency {concurrency}: {rows[-1]}", flush=True)
    return rows


def _driver() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _tensorrt_tests() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "tensorrt", "-q", "-rs", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
    )
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    ok = result.returncode == 0 and "skipped" not in summary and "passed" in summary
    return {"ok": ok, "summary": summary, "output": result.stdout[-4000:] + result.stderr[-2000:]}


def run(seconds: float) -> dict[str, Any]:
    report: dict[str, Any] = {"steps": {}, "failures": []}

    def step(name: str, work: Any) -> Any:
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        try:
            value = work()
        except Exception as exc:
            report["failures"].append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
            return None
        report["steps"][name] = {"seconds": round(time.perf_counter() - start, 1), "result": value}
        return value

    for task in MODELS:
        step(f"{task}: export + engine", lambda task=task: _export(task, WORK / task))
    tests = step("pytest -m tensorrt", _tensorrt_tests)
    if tests is not None and not tests["ok"]:
        report["failures"].append(f"pytest -m tensorrt: {tests['summary']}")
    for task, spec in MODELS.items():
        built = report["steps"].get(f"{task}: export + engine", {}).get("result")
        if not built:
            continue
        if not built["strongly_typed"] or built["tf32"]:
            report["failures"].append(f"{task}: the engine is not strongly typed with TF32 off: {built}")
        parity = step(f"{task}: parity", lambda task=task: _parity(WORK / task))
        for row in parity or []:
            if not row["ok"]:
                report["failures"].append(
                    f"{task}: parity at batch {row['batch']}: {row['measure']} {row['value']:.3g} "
                    f"(limit {PARITY_LIMIT})"
                )
        load = step(f"{task}: load", lambda task=task, spec=spec: _serve_and_load(WORK / task, spec["route"], seconds))
        for row in load or []:
            if row["errors"]:
                report["failures"].append(f"{task}: load at concurrency {row['concurrency']}: failed requests {row}")
    return report


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    steps = report["steps"]
    built: dict[str, Any] = next((s["result"] for k, s in steps.items() if k.endswith("export + engine")), {})
    lines = [
        "# GPU check: the TensorRT path",
        "",
        f"GPU {built.get('gpu', '?')} (sm {built.get('compute_capability', '?')}, driver "
        f"{report.get('driver', '?')}), TensorRT {built.get('tensorrt', '?')}; random-init Focal-T, fp16 engines "
        f"(strongly typed: {built.get('strongly_typed', '?')}, TF32: {built.get('tf32', '?')}).",
        "",
        "**Result: " + ("all steps passed**" if not report["failures"] else "FAILED**"),
        *[f"- {failure}" for failure in report["failures"]],
        "",
        "| model | export s | engine build s | engine MB |",
        "|---|---:|---:|---:|",
    ]
    for task in MODELS:
        r = steps.get(f"{task}: export + engine", {}).get("result")
        if r:
            lines.append(f"| {task} | {r['export_s']} | {r['engine_build_s']} | {r['engine_mb']} |")
    lines += ["", f"Parity, engine vs ONNX Runtime (limit {PARITY_LIMIT}):", "",
              "| model | output | batch | reference | measure | value | same candidates | ok |",
              "|---|---|---:|---|---|---:|---:|---|"]  # fmt: skip
    for task in MODELS:
        for r in steps.get(f"{task}: parity", {}).get("result") or []:
            agreement = "" if r["agreement"] is None else f"{r['agreement']:.1%}"
            lines.append(
                f"| {task} | {r['output']} | {r['batch']} | {r['reference']} | {r['measure']} | {r['value']:.3g} | "
                f"{agreement} | {'yes' if r['ok'] else 'NO'} |"
            )
    lines += ["", "Served (640x480 JPEG; client concurrency, and the batches the server formed):", "",
              "| model | concurrency | avg batch | img/s | p50 ms | p95 ms | host CPU ms/img | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for task in MODELS:
        for r in steps.get(f"{task}: load", {}).get("result") or []:
            if "error" in r:
                lines.append(f"| {task} | {r['concurrency']} | {r['error']} | | | | | 1 |")
                continue
            lines.append(
                f"| {task} | {r['concurrency']} | {r['avg_batch']} | {r['images_per_s']} | {r['p50_ms']} | "
                f"{r['p95_ms']} | {r['host_cpu_ms_per_image']} | {r['errors']} |"
            )
    tests = steps.get("pytest -m tensorrt", {}).get("result")
    if tests:
        lines += ["", f"TensorRT-marked tests (the real classifier engine build; the backend is tested against "
                  f"fakes only, and runs for real in the load step above): {tests['summary']}"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="load per engine, over all concurrencies")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.md")
    args = parser.parse_args(argv)
    reason = preflight()
    if reason:
        print(f"gpu-check: cannot run here: {reason}", file=sys.stderr)
        return 2
    report = run(args.seconds)
    report["driver"] = _driver()
    write_report(report, args.out)
    print(args.out.read_text())
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
