"""CPU throughput: our PyTorch model vs its ONNX export on onnxruntime, against the machine's matmul peak.

    python -m bench.cpu_throughput [--variant focal_tiny] [--threads 2] [--rounds 7]

Everything is measured in one run, interleaved (peak, PyTorch, ONNX, PyTorch,
ONNX, ...) with medians, because shared machines have slow phases of seconds.
The fp32 matmul peak is the better of onnxruntime's MatMul and torch.mm on
2048x2048 matrices with the same thread count. Results go to
bench/results/cpu_throughput.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from export.options import ExportOptions
from export.pipeline import run_export
from focal import create_model
from focal.info import official_macs

RESULTS = Path(__file__).parent / "results"
PEAK_N = 2048


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ort_matmul(threads: int) -> Callable[[], object]:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [PEAK_N, PEAK_N])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [PEAK_N, PEAK_N])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [PEAK_N, PEAK_N])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(model.SerializeToString(), _options(threads), providers=["CPUExecutionProvider"])
    feed = {n: np.random.default_rng(0).standard_normal((PEAK_N, PEAK_N), dtype=np.float32) for n in "ab"}
    return lambda: sess.run(None, feed)


def _torch_matmul() -> Callable[[], object]:
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    return lambda: a @ b


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def run(variant: str, threads: int, rounds: int, batches: tuple[int, ...]) -> dict[str, Any]:
    torch.set_num_threads(threads)
    export_dir = Path("artifacts") / f"bench-{variant}-random-init"
    manifest = run_export(
        ExportOptions(variant=variant, random_init=True, out=export_dir, engine="skip"), log=lambda _: None
    )
    h, w = manifest.input_size
    torch.manual_seed(0)
    model = create_model(variant, img_size=(h, w))
    gflop_per_image = 2 * official_macs(model) / 1e9
    sess = ort.InferenceSession(
        str(export_dir / manifest.onnx_fp32), _options(threads), providers=["CPUExecutionProvider"]
    )
    inputs = {b: np.random.default_rng(b).standard_normal((b, 3, h, w), dtype=np.float32) for b in batches}

    def torch_fn(b: int) -> Callable[[], object]:
        x = torch.from_numpy(inputs[b])

        def call() -> object:
            with torch.inference_mode():
                return model(x)

        return call

    def ort_fn(b: int) -> Callable[[], object]:
        return lambda: sess.run(None, {"pixels": inputs[b]})

    peak_fns = {"onnxruntime MatMul": _ort_matmul(threads), "torch.mm": _torch_matmul()}
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):  # interleaved: every round measures everything once
        for name, fn in peak_fns.items():
            samples.setdefault(f"peak/{name}", []).append(2 * PEAK_N**3 / _timed(fn, 3) / 1e9)
        for b in batches:
            for label, make in (("pytorch", torch_fn), ("onnxruntime", ort_fn)):
                samples.setdefault(f"{label}/{b}", []).append(b / _timed(make(b), 1 if b > 1 else 3))

    peaks = {k.split("/", 1)[1]: statistics.median(v) for k, v in samples.items() if k.startswith("peak/")}
    peak = max(peaks.values())
    rows = []
    for b in batches:
        for label in ("pytorch", "onnxruntime"):
            ips = statistics.median(samples[f"{label}/{b}"])
            gflops = ips * gflop_per_image
            rows.append(
                {
                    "engine": label,
                    "batch": b,
                    "images_per_s": round(ips, 2),
                    "gflop_per_s": round(gflops, 1),
                    "fraction_of_peak": round(gflops / peak, 3),
                    "fraction_of_each_peak": {k: round(gflops / v, 3) for k, v in peaks.items()},
                    "samples_images_per_s": [round(s, 2) for s in samples[f"{label}/{b}"]],
                }
            )
    return {
        "variant": variant,
        "input_size": [h, w],
        "gflop_per_image": round(gflop_per_image, 3),
        "threads": threads,
        "rounds": rounds,
        "peak_gflop_per_s": {k: round(v, 1) for k, v in peaks.items()},
        "peak_used": round(peak, 1),
        "onnx_nodes": manifest.graph.node_count,
        "machine": {
            "cpu": _cpu_name(),
            "cores_visible": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "results": rows,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_reports(result: dict[str, Any], folder: Path = RESULTS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "cpu_throughput.json", folder / "cpu_throughput.md", folder / "cpu_throughput.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# CPU throughput: {result['variant']} at {result['input_size'][0]}x{result['input_size'][1]}",
        "",
        f"{result['machine']['cpu']}, {result['threads']} threads; torch {result['machine']['torch']}, "
        f"onnxruntime {result['machine']['onnxruntime']}; {result['gflop_per_image']} GFLOP per image; "
        f"medians of {result['rounds']} interleaved rounds.",
        "",
        "fp32 matmul peak (2048x2048): "
        + ", ".join(f"{k} {v} GFLOP/s" for k, v in result["peak_gflop_per_s"].items())
        + f"; the plot's reference is the better one ({result['peak_used']} GFLOP/s).",
        "",
        "| engine | batch | images/s | GFLOP/s | "
        + " | ".join(f"of {k} peak" for k in result["peak_gflop_per_s"])
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(result["peak_gflop_per_s"]),
    ]
    for r in result["results"]:
        fractions = " | ".join(f"{f:.0%}" for f in r["fraction_of_each_peak"].values())
        lines.append(f"| {r['engine']} | {r['batch']} | {r['images_per_s']} | {r['gflop_per_s']} | {fractions} |")
    paths[1].write_text("\n".join(lines) + "\n")
    _plot(result, paths[2])
    return paths


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for i, engine in enumerate(("pytorch", "onnxruntime")):
        values = [next(r["gflop_per_s"] for r in rows if r["engine"] == engine and r["batch"] == b) for b in batches]
        ax.bar([x + (i - 0.5) * width for x in range(len(batches))], values, width, label=engine)
    for (name, value), style in zip(result["peak_gflop_per_s"].items(), ("--", ":"), strict=False):
        ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{name} peak")
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("GFLOP/s")
    ax.set_title(
        f"{result['variant']} {result['input_size'][0]}x{result['input_size'][1]}, {result['threads']} threads"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="focal_tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.variant, args.threads, args.rounds, (1, 8))
    for path in write_reports(result, args.out):
        print(f"wrote {path}")
    print(args.out.joinpath("cpu_throughput.md").read_text())


if __name__ == "__main__":
    main()
