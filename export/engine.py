"""`python -m export.engine --model DIR`: build, or reuse, the TensorRT engine of an export folder.

An engine only runs with the GPU type and TensorRT version it was built with, so it
is built where it will run: by the export when the export runs on that machine, or
by this command in the GPU serving image (a Kubernetes init container, the Compose
one-shot `engine` service). It needs no torch. The engine is reused when the folder
already holds one for the same GPU, compute capability, TensorRT version, ONNX
sha256, precision and batch profile; otherwise it is built and the manifest updated.

`--source DIR` first copies an export folder (e.g. a read-only volume) into DIR
(a writable engine cache), unless DIR already holds the same export.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export import tensorrt_engine
from export.manifest import MANIFEST_NAME, read_manifest, write_manifest
from export.weights import sha256_file

ENGINE = "model.engine"
ENGINE_MODES = ("auto", "required", "skip")


def ensure_engine(
    folder: Path,
    manifest: dict[str, Any],
    mode: str,
    workspace_gib: float = 4.0,
    timing_cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Make `manifest` (of `folder`) describe a usable engine, or say why there is none. Raises EngineError."""

    def skip(reason: str) -> None:
        manifest["engine"], manifest["engine_info"], manifest["engine_skipped_reason"] = None, None, reason
        (folder / ENGINE).unlink(missing_ok=True)  # never leave an engine the manifest does not describe
        manifest.get("sha256", {}).pop(ENGINE, None)
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
    fp16 = manifest["precision"] == "fp16"
    source = manifest["onnx"] if fp16 else manifest["onnx_fp32"]
    batch = manifest["batch"]
    target = {
        "tensorrt_version": probe.tensorrt_version,
        "gpu_name": probe.gpu_name,
        "compute_capability": probe.compute_capability,
        "precision": manifest["precision"],
        "batch": batch,
        "onnx_sha256": sha256_file(folder / source),
    }
    previous = manifest.get("engine_info") or {}
    recorded = manifest.get("sha256", {}).get(ENGINE)
    if (
        all(previous.get(k) == v for k, v in target.items())
        and recorded
        and (folder / ENGINE).is_file()
        and sha256_file(folder / ENGINE) == recorded
    ):
        log(f"reusing {ENGINE} (built for {probe.gpu_name}, TensorRT {probe.tensorrt_version})")
        return
    h, w = manifest["input_size"]
    details = tensorrt_engine.build_engine(
        fp32_onnx=folder / manifest["onnx_fp32"],
        fp16_onnx=folder / manifest["onnx"] if fp16 else None,
        engine_path=folder / ENGINE,
        input_name=manifest["input"]["name"],
        input_shape=(3, h, w),
        batch=(batch["min"], batch["opt"], batch["max"]),
        workspace_bytes=int(workspace_gib * (1 << 30)),
        timing_cache=timing_cache,
        log=log,
    )
    manifest["engine"] = ENGINE
    manifest["engine_info"] = {**target, **details}
    manifest["engine_skipped_reason"] = None
    manifest.setdefault("sha256", {})[ENGINE] = sha256_file(folder / ENGINE)
    log(f"built {ENGINE} for {probe.gpu_name} (sm {probe.compute_capability}), TensorRT {probe.tensorrt_version}")


def copy_export(source: Path, target: Path, log: Callable[[str], None] = print) -> None:
    """Copy an export folder's artifacts into `target`, unless it already holds the same export."""
    manifest = read_manifest(source)
    if manifest is None:
        raise FileNotFoundError(f"{source}: no readable {MANIFEST_NAME}")
    names = sorted({manifest["onnx"], manifest["onnx_fp32"], manifest["labels"]})
    current = read_manifest(target)
    if current is not None and all(current.get("sha256", {}).get(n) == manifest["sha256"].get(n) for n in names):
        log(f"{target} already holds this export")
        return
    target.mkdir(parents=True, exist_ok=True)
    (target / MANIFEST_NAME).unlink(missing_ok=True)  # the manifest goes last: never one over half-copied files
    (target / ENGINE).unlink(missing_ok=True)
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
        if manifest is None:
            raise FileNotFoundError(f"{args.model}: no readable {MANIFEST_NAME}")
        ensure_engine(args.model, manifest, args.engine, args.workspace_gib, args.timing_cache)
        write_manifest(args.model, manifest)
    except (tensorrt_engine.EngineError, OSError, KeyError) as exc:
        print(f"engine build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
