"""CPU throughput: our PyTorch models vs their ONNX exports on onnxruntime, against the machine's matmul peak.

    python -m bench.cpu_throughput [--variants focal_tiny,focal_fast_tiny] [--threads 2] [--rounds 7] [--int8]
                                   [--out bench/results]

Everything is measured in one run, interleaved (peak, then every variant's PyTorch
and ONNX, round after round) with medians, because shared machines have slow
phases of seconds; so the variants are compared side by side. The fp32 matmul
peak is the better of onnxruntime's MatMul and torch.mm on 2048x2048 matrices with
the same thread count, and each variant's share of it is computed at that
variant's own MAC count (the official flops() convention of its family). With
--int8 the exports are made with --int8 and their int8 graphs measured too (their
"GFLOP/s" is the fp32 model's work done per second, for comparison).
Results go to bench/results/cpu_throughput.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class _Subject:
    """One variant under test: its PyTorch model, its onnxruntime session, and what its work is."""

    variant: str
    size: tuple[int, int]
    gflop_per_image: float
    params: int
    onnx_nodes: int
    model: torch.nn.Module
    session: ort.InferenceSession
    int8_session: ort.InferenceSession | None


def _prepare(variant: str, threads: int, int8: bool) -> _Subject:
    export_dir = Path("artifacts") / f"bench-{variant}-random-init-float{'-int8' if int8 else ''}"
    manifest = run_export(
        # float input: PyTorch and the graphs get the same normalised tensors (the model's cost alone)
        ExportOptions(variant=variant, random_init=True, int8=int8, out=export_dir, engine="skip", uint8_input=False),
        log=lambda _: None,
    )
    h, w = manifest.input_size
    torch.manual_seed(0)
    model = create_model(variant, img_size=(h, w))
    session, int8_session = (
        ort.InferenceSession(str(export_dir / name), _options(threads), providers=["CPUExecutionProvider"])
        if name
        else None
        for name in (manifest.onnx_fp32, manifest.onnx_int8)
    )
    assert session is not None
    return _Subject(
        variant=variant,
        size=(h, w),
        gflop_per_image=2 * official_macs(model) / 1e9,
        params=sum(p.numel() for p in model.parameters()),
        onnx_nodes=manifest.graph.node_count,
        model=model,
        session=session,
        int8_session=int8_session,
    )


def run(variants: list[str], threads: int, rounds: int, batches: tuple[int, ...], int8: bool = False) -> dict[str, Any]:
    torch.set_num_threads(threads)
    subjects = [_prepare(v, threads, int8) for v in variants]
    rng = np.random.default_rng(0)
    inputs = {(s.variant, b): rng.standard_normal((b, 3, *s.size), dtype=np.float32) for s in subjects for b in batches}

    def torch_fn(s: _Subject, b: int) -> Callable[[], object]:
        x = torch.from_numpy(inputs[s.variant, b])

        def call() -> object:
            with torch.inference_mode():
                return s.model(x)

        return call

    def ort_fn(s: _Subject, b: int) -> Callable[[], object]:
        return lambda: s.session.run(None, {"pixels": inputs[s.variant, b]})

    def int8_fn(s: _Subject, b: int) -> Callable[[], object]:
        session = s.int8_session
        assert session is not None
        return lambda: session.run(None, {"pixels": inputs[s.variant, b]})

    engines: list[tuple[str, Callable[[_Subject, int], Callable[[], object]]]] = [
        ("pytorch", torch_fn),
        ("onnxruntime", ort_fn),
    ]
    engines += [("onnxruntime int8", int8_fn)] if int8 else []

    peak_fns = {"onnxruntime MatMul": _ort_matmul(threads), "torch.mm": _torch_matmul()}
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):  # interleaved: every round measures everything once
        for name, fn in peak_fns.items():
            samples.setdefault(f"peak/{name}", []).append(2 * PEAK_N**3 / _timed(fn, 3) / 1e9)
        for s in subjects:
            for b in batches:
                for label, make in engines:
                    seconds = _timed(make(s, b), 1 if b > 1 else 3)
                    samples.setdefault(f"{s.variant}/{label}/{b}", []).append(b / seconds)

    peaks = {k.split("/", 1)[1]: statistics.median(v) for k, v in samples.items() if k.startswith("peak/")}
    peak = max(peaks.values())
    rows = []
    for s in subjects:
        for b in batches:
            for label, _ in engines:
                runs = samples[f"{s.variant}/{label}/{b}"]
                ips = statistics.median(runs)
                gflops = ips * s.gflop_per_image
                rows.append(
                    {
                        "variant": s.variant,
                        "engine": label,
                        "batch": b,
                        "images_per_s": round(ips, 2),
                        "gflop_per_s": round(gflops, 1),
                        "fraction_of_peak": round(gflops / peak, 3),
                        "fraction_of_each_peak": {k: round(gflops / v, 3) for k, v in peaks.items()},
                        "samples_images_per_s": [round(x, 2) for x in runs],
                    }
                )
    return {
        "int8": int8,
        "variants": [
            {
                "variant": s.variant,
                "input_size": list(s.size),
                "params": s.params,
                "gflop_per_image": round(s.gflop_per_image, 3),
                "onnx_nodes": s.onnx_nodes,
            }
            for s in subjects
        ],
        "threads": threads,
        "rounds": rounds,
        "peak_gflop_per_s": {k: round(v, 1) for k, v in peaks.items()},
        "peak_used": round(peak, 1),
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
    names = ", ".join(v["variant"] for v in result["variants"])
    lines = [
        f"# CPU throughput: {names}",
        "",
        f"{result['machine']['cpu']}, {result['threads']} threads; torch {result['machine']['torch']}, "
        f"onnxruntime {result['machine']['onnxruntime']}; medians of {result['rounds']} rounds, the variants "
        "interleaved in each round (measured side by side).",
        "",
        "| variant | input | parameters | GFLOP per image (2 x official MACs) | ONNX nodes |",
        "|---|---|---:|---:|---:|",
    ]
    for v in result["variants"]:
        lines.append(
            f"| {v['variant']} | {v['input_size'][0]}x{v['input_size'][1]} | {v['params'] / 1e6:.2f} M | "
            f"{v['gflop_per_image']} | {v['onnx_nodes']} |"
        )
    lines += [
        "",
        "fp32 matmul peak (2048x2048): "
        + ", ".join(f"{k} {v} GFLOP/s" for k, v in result["peak_gflop_per_s"].items())
        + f"; the plot's reference is the better one ({result['peak_used']} GFLOP/s).",
        "",
        "| variant | engine | batch | images/s | GFLOP/s | "
        + " | ".join(f"of {k} peak" for k in result["peak_gflop_per_s"])
        + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(result["peak_gflop_per_s"]),
    ]
    if result.get("int8"):
        lines[-2:-2] = [
            "The int8 rows' GFLOP/s is the fp32 model's work per second, so they can pass the fp32 peak.",
            "",
        ]
    for r in result["results"]:
        fractions = " | ".join(f"{f:.0%}" for f in r["fraction_of_each_peak"].values())
        lines.append(
            f"| {r['variant']} | {r['engine']} | {r['batch']} | {r['images_per_s']} | {r['gflop_per_s']} | "
            f"{fractions} |"
        )
    paths[1].write_text("\n".join(lines) + "\n")
    _plot(result, paths[2])
    return paths


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    groups = sorted({(r["variant"], r["batch"]) for r in rows}, key=lambda g: (g[1], g[0]))
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 3.5))
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        values = [
            next(r["gflop_per_s"] for r in rows if (r["variant"], r["batch"], r["engine"]) == (v, b, engine))
            for v, b in groups
        ]
        offset = (i - (len(engines) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(groups))], values, width, label=engine)
    for (name, value), style in zip(result["peak_gflop_per_s"].items(), ("--", ":"), strict=False):
        ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{name} peak")
    ax.set_xticks(range(len(groups)), [f"{v}\nbatch {b}" for v, b in groups], fontsize=8)
    ax.set_ylabel("GFLOP/s (official MACs)")
    ax.set_title(f"CPU throughput, {result['threads']} threads")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        "--variant",
        default="focal_tiny,focal_fast_tiny",
        help="comma-separated variants, measured side by side (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--int8", action="store_true", help="also the int8 graph of an --int8 export (onnxruntime dynamic quantization)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    result = run(variants, args.threads, args.rounds, (1, 8), int8=args.int8)
    for path in write_reports(result, args.out):
        print(f"wrote {path}")
    print(args.out.joinpath("cpu_throughput.md").read_text())


if __name__ == "__main__":
    main()
