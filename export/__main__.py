"""`python -m export`: weights -> verified ONNX (fp32, optionally fp16) -> TensorRT engine -> manifest.json."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from export.canvases import CANVAS_SETS, DEFAULT_CANVAS_SET, parse_canvases, parse_scale
from export.engine import ENGINE_MODES
from export.graph_gate import GraphGateError
from export.options import ExportError, ExportOptions
from export.pipeline import run_export
from export.tasks import TASKS
from export.verify import VerificationError
from focal import CheckpointError, variant_names
from focal.__main__ import parse_image_size


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def _canvases(text: str) -> list[tuple[int, int]]:
    try:
        return parse_canvases(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scale(text: str) -> tuple[int, int]:
    try:
        return parse_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--variant", required=True, help=f"one of {', '.join(variant_names())} (or an official long name)")
    p.add_argument("--task", choices=list(TASKS), default="classify")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument(
        "--weights",
        type=Path,
        metavar="PATH",
        help="local checkpoint (.pth, state dict, .safetensors); for --task detect an mmdetection RetinaNet one",
    )
    weights.add_argument(
        "--pretrained",
        action="store_true",
        help="download the official ImageNet checkpoint (the default for classify; for detect: the backbone)",
    )
    weights.add_argument("--random-init", action="store_true", help="untrained weights, marked as such everywhere")
    weights.add_argument(
        "--backbone-weights",
        type=Path,
        metavar="PATH",
        help="--task detect: initialise the backbone from an ImageNet classification checkpoint (FPN, head untrained)",
    )
    p.add_argument(
        "--image-size",
        type=parse_image_size,
        default=None,
        metavar="N|HxW",
        help="classify: the input size (default 224); a detector has canvases instead (--canvases)",
    )
    p.add_argument(
        "--canvas-set",
        choices=list(CANVAS_SETS),
        default=None,
        help="detect: the canvases of the common photo shapes at mmdetection's test scale: "
        + ", ".join(f"{name} = {long}x{short}" for name, (long, short) in CANVAS_SETS.items())
        + f" (default {DEFAULT_CANVAS_SET}; README: Detection)",
    )
    p.add_argument(
        "--canvases",
        type=_canvases,
        default=None,
        metavar="HxW[,HxW...]",
        help="detect: these canvases instead of a set, e.g. 640x640 for one fixed canvas",
    )
    p.add_argument(
        "--test-scale",
        type=_scale,
        default=None,
        metavar="LONGxSHORT",
        help="detect, with --canvases: mmdetection's keep-ratio test scale (default: the canvases' longest side "
        "and longest short side)",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="also write an fp16 ONNX (LayerNorm/Softmax kept fp32), verified against fp32 (fails beyond 1e-2)",
    )
    p.add_argument(
        "--uint8-input",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the graphs take uint8 RGB pixels [N,3,H,W] and normalise them (a 4x smaller input, no float "
        "conversion on the host); default: on for classify, off (not offered) for detect",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write an int8 graph (onnxruntime dynamic quantization, verified against fp32) that a CPU "
        "service runs instead of fp32 (classification)",
    )
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=None, help="default: 8 (classify), 2 (detect)")
    p.add_argument("--max-batch", type=int, default=None, help="default: 32 (classify), 8 (detect)")
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (default: a descriptive name under artifacts/)"
    )
    p.add_argument(
        "--engine", choices=ENGINE_MODES, default="auto", help="TensorRT engine: auto (if possible), required, skip"
    )
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace limit")
    p.add_argument("--timing-cache", type=Path, metavar="PATH", help="TensorRT timing cache, reused across builds")
    p.add_argument(
        "--model-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="official constructor keywords overriding the variant, e.g. '{\"num_classes\": 10}'",
    )
    p.add_argument("--labels", type=Path, metavar="PATH", help="class names, one per line (default: ImageNet-1K)")
    p.add_argument(
        "--model-version",
        default="1",
        metavar="V",
        help="the version the service reports for this model (Open Inference Protocol), default 1",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ExportOptions(
        variant=args.variant,
        task=args.task,
        weights=args.weights,
        pretrained=args.pretrained,
        random_init=args.random_init,
        backbone_weights=args.backbone_weights,
        image_size=args.image_size,
        canvases=args.canvases,
        canvas_set=args.canvas_set,
        test_scale=args.test_scale,
        fp16=args.fp16,
        int8=args.int8,
        uint8_input=args.uint8_input,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch or 0,
        max_batch=args.max_batch or 0,
        out=args.out,
        engine=args.engine,
        workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache,
        model_kwargs=args.model_kwargs,
        labels=args.labels,
        model_version=args.model_version,
    )
    start = time.perf_counter()
    try:
        manifest = run_export(opts, log=lambda line: print(line, flush=True))
    except (ExportError, CheckpointError, GraphGateError, VerificationError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export interrupted (the output folder has no manifest until an export completes)", file=sys.stderr)
        return 130
    except Exception as exc:  # anything unforeseen still ends in one line, not a traceback
        print(f"export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    out = opts.out or opts.default_out()
    views = manifest.canvas_views()
    engines = [v.engine.path for v in views if v.engine]
    engine = ", ".join(engines) if engines else f"none ({manifest.engine_skipped_reason})"
    cpu = f", {manifest.onnx_int8} for CPUs" if manifest.onnx_int8 else ""
    graphs = manifest.onnx if len(views) == 1 else f"{len(views)} canvases ({', '.join(v.onnx for v in views)})"
    took = time.perf_counter() - start
    print(f"exported {manifest.variant} to {out} in {took:.0f} s: {graphs}{cpu}, engine {engine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
