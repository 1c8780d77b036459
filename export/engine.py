"""`python -m export.engine --model DIR`: build, or reuse, the TensorRT engine of an export folder.

An engine only runs with the GPU type and TensorRT version it was built with, so it
is built where it will run: by the export when the export runs on that machine, or
by this command in the GPU serving image (a Kubernetes init container, the Compose
one-shot `engine` service). It needs no torch. The engine is reused when the folder
already holds one for the same GPU, compute capability, TensorRT version, ONNX
sha256 (and its weights file's, for a detector's canvases), precision and batch profile;
otherwise it is built and the manifest updated. A detector has one engine per canvas.

`--source DIR` first copies an export folder (e.g. a read-only volume) into DIR
(a writable engine cache), unless DIR already holds the same export.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from export import tensorrt_engine
from export.canvases import WEIGHTS_DATA
from manifest import MANIFEST_NAME, Engine, Manifest, ManifestError, read_manifest, sha256_file

ENGINE = "model.engine"  # of an export with one input size (`engine_name`)
ENGINE_MODES = ("auto", "required", "skip")


def engine_name(manifest: Manifest) -> str:
    """The engine file of a manifest's graph: `model.engine`, or `model.480x640.engine` for one canvas of several."""
    return manifest.onnx_fp32.removesuffix(".fp32.onnx") + ".engine"


def ensure_engines(
    folder: Path,
    manifest: Manifest,
    mode: str,
    workspace_gib: float = 4.0,
    timing_cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """`ensure_engine` for each input size of the export (one engine per canvas of a detector)."""
    views = manifest.canvas_views()
    data = functools.cache(functools.partial(_data_sha256, folder, manifest))  # hashed once, if ever needed
    for view in views:
        if len(views) > 1:
            log(f"canvas {view.input_size[0]}x{view.input_size[1]}:")
        ensure_engine(folder, view, mode, workspace_gib, timing_cache, log, data_sha256=data)
        manifest.keep_canvas(view)


def ensure_engine(
    folder: Path,
    manifest: Manifest,
    mode: str,
    workspace_gib: float = 4.0,
    timing_cache: Path | None = None,
    log: Callable[[str], None] = print,
    data_sha256: Callable[[], str | None] | None = None,
) -> None:
    """Make `manifest` (of `folder`) describe a usable engine, or say why there is none. Raises EngineError.
    `data_sha256`: gives the sha256 of the manifest's weights file (the caller's, to hash it once)."""

    path = engine_name(manifest)

    def skip(reason: str) -> None:
        manifest.engine, manifest.engine_skipped_reason = None, reason
        (folder / path).unlink(missing_ok=True)  # never leave an engine the manifest does not describe
        manifest.sha256.pop(path, None)
        log(f"skipped: {reason}")

    if mode == "skip":
        skip("--engine skip")
        return
    probe = tensorrt_engine.probe()
    if not probe.available:
        if mode == "required":
            raise tensorrt_engine.EngineError(f"--engine required, but no engine can be built here: {probe.reason}")
        skip(probe.reason or "TensorRT unavailable")
        return
    fp16 = manifest.precision == "fp16"
    source = manifest.onnx if fp16 else manifest.onnx_fp32
    target = {
        "tensorrt_version": probe.tensorrt_version or "",
        "gpu_name": probe.gpu_name or "",
        "compute_capability": probe.compute_capability or "",
        "precision": manifest.precision,
        "batch": manifest.batch,
        "onnx_sha256": sha256_file(folder / source),
        # The graph names its weights by offset only: the weights file is part of what the engine was built from.
        "onnx_data_sha256": (data_sha256 or functools.partial(_data_sha256, folder, manifest))(),
    }
    previous = manifest.engine
    if (
        previous is not None
        and all(getattr(previous, k) == v for k, v in target.items())
        and previous.strongly_typed
        and not previous.tf32  # engines from before strong typing and cleared TF32 are rebuilt
        and manifest.intact(folder, [previous.path])
    ):
        log(f"reusing {previous.path} (built for {probe.gpu_name}, TensorRT {probe.tensorrt_version})")
        return
    batch = manifest.batch
    details = tensorrt_engine.build_engine(
        fp32_onnx=folder / manifest.onnx_fp32,
        fp16_onnx=folder / manifest.onnx if fp16 else None,
        engine_path=folder / path,
        input_name=manifest.input.name,
        input_shape=(3, *manifest.input_size),
        batch=(batch.min, batch.opt, batch.max),
        workspace_bytes=int(workspace_gib * (1 << 30)),
        timing_cache=timing_cache,
        log=log,
    )
    manifest.engine = Engine.model_validate({**target, **details, "path": path})
    manifest.engine_skipped_reason = None
    manifest.sha256[path] = sha256_file(folder / path)
    log(f"built {path} for {probe.gpu_name} (sm {probe.compute_capability}), TensorRT {probe.tensorrt_version}")


def _data_sha256(folder: Path, manifest: Manifest) -> str | None:
    """Of the weights file as it is on disk (not as recorded: a changed file must not reuse an engine)."""
    return sha256_file(folder / manifest.onnx_data) if manifest.onnx_data else None


def copy_export(source: Path, target: Path, log: Callable[[str], None] = print) -> None:
    """Copy an export folder's artifacts into `target`, unless it already holds the same export."""
    manifest = read_manifest(source)
    names = sorted({*manifest.onnx_names, manifest.labels})
    try:
        current: Manifest | None = read_manifest(target)
    except ManifestError:
        current = None
    same = current is not None and current.onnx_names == manifest.onnx_names and current.inputs == manifest.inputs
    if same and current is not None and all(current.sha256.get(n) == manifest.sha256.get(n) for n in names):
        log(f"{target} already holds this export")
        return
    target.mkdir(parents=True, exist_ok=True)
    (target / MANIFEST_NAME).unlink(missing_ok=True)  # the manifest goes last: never one over half-copied files
    for stale in [*target.glob("model*.onnx"), *target.glob("model*.engine"), target / WEIGHTS_DATA]:
        stale.unlink(missing_ok=True)  # an earlier export's graphs, engines and weights, whatever their canvases
    for name in names:
        shutil.copyfile(source / name, target / name)
    shutil.copyfile(source / MANIFEST_NAME, target / MANIFEST_NAME)
    log(f"copied the export from {source} to {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.engine", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, metavar="DIR", help="export folder to build the engine in")
    parser.add_argument("--source", type=Path, metavar="DIR", help="copy this export folder into --model first")
    parser.add_argument("--engine", choices=ENGINE_MODES, default="required")
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    parser.add_argument("--timing-cache", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    try:
        if args.source is not None:
            copy_export(args.source, args.model)
        manifest = read_manifest(args.model)
        ensure_engines(args.model, manifest, args.engine, args.workspace_gib, args.timing_cache)
        manifest.write(args.model)
    except (tensorrt_engine.EngineError, ManifestError, OSError) as exc:
        print(f"engine build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
