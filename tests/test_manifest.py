"""The manifest contract (`manifest/`): typed, versioned, validated on read, importable without either side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ClassifyManifest,
    DetectManifest,
    ManifestError,
    parse_manifest,
    read_manifest,
)
from tests.support import ROOT, classify_manifest, detect_manifest


def test_a_written_manifest_reads_back_as_its_task(tmp_path: Path) -> None:
    for manifest in (classify_manifest(), detect_manifest()):
        manifest.write(tmp_path)
        again = read_manifest(tmp_path)
        assert type(again) is type(manifest)
        assert again.model_dump(mode="json") == manifest.model_dump(mode="json")
        assert json.loads((tmp_path / MANIFEST_NAME).read_text())["format_version"] == FORMAT_VERSION
    assert isinstance(read_manifest(tmp_path), DetectManifest)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_bad_manifests_are_refused_with_what_is_wrong(tmp_path: Path) -> None:
    data = classify_manifest().model_dump(mode="json")
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="not readable JSON"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError, match="manifest format 1, this version reads 2; export the model again"):
        parse_manifest({**data, "format_version": 1})
    with pytest.raises(ManifestError, match="task 'segment' cannot be served"):
        parse_manifest({**data, "task": "segment"})
    with pytest.raises(ManifestError, match=r"classify\.batch: Value error, batch profile must satisfy"):
        parse_manifest({**data, "batch": {"min": 1, "opt": 9, "max": 4}})
    with pytest.raises(ManifestError, match=r"classify\.preprocess\.crop: Field required"):
        parse_manifest({**data, "preprocess": {k: v for k, v in data["preprocess"].items() if k != "crop"}})
    with pytest.raises(ManifestError, match=r"detect\.detection: Field required"):
        parse_manifest({**data, "task": "detect"})
    with pytest.raises(ManifestError, match=r"classify\.surprise: Extra inputs are not permitted"):
        parse_manifest({**data, "surprise": 1})
    assert isinstance(parse_manifest(data), ClassifyManifest)


def test_the_contract_imports_neither_side_nor_torch() -> None:
    code = "import sys, manifest; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('torch', 'focal', 'export', 'service', 'onnx', 'onnxruntime')))"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_detector_with_several_canvases_reads_as_one_manifest_per_canvas(tmp_path: Path) -> None:
    manifest = detect_manifest(canvas=(64, 96), more_canvases=((96, 64), (64, 64)), test_scale=(96, 64))
    manifest.write(tmp_path)
    again = read_manifest(tmp_path)
    assert isinstance(again, DetectManifest)
    assert again.model_dump(mode="json") == manifest.model_dump(mode="json")
    assert again.canvas_sizes == [(64, 96), (96, 64), (64, 64)]
    views = again.canvas_views()
    assert [(v.input_size, v.preprocess.canvas, v.detection.canvas, v.input.sample_shape) for v in views] == [
        ((64, 96), (64, 96), (64, 96), (3, 64, 96)),
        ((96, 64), (96, 64), (96, 64), (3, 96, 64)),
        ((64, 64), (64, 64), (64, 64), (3, 64, 64)),
    ]
    assert [v.onnx_fp32 for v in views] == ["model.fp32.onnx", "model.96x64.fp32.onnx", "model.64x64.fp32.onnx"]
    assert [v.detection.levels[0].size for v in views] == [(8, 12), (12, 8), (8, 8)]
    assert all(v.canvases == [] for v in views)
    assert again.onnx_names == ["model.64x64.fp32.onnx", "model.96x64.fp32.onnx", "model.fp32.onnx"]
    # An engine built for one view is kept in its own canvas's entry.
    views[1].engine_skipped_reason = "built elsewhere"
    again.keep_canvas(views[1])
    assert [v.engine_skipped_reason for v in again.canvas_views()] == ["a test folder", "built elsewhere", None]
    data = again.model_dump(mode="json")
    with pytest.raises(ManifestError, match="canvases listed twice"):
        parse_manifest({**data, "canvases": [data["canvases"][0]] * 2})


def test_a_one_canvas_detector_writes_the_fields_it_always_had(tmp_path: Path) -> None:
    """Readers from before canvas buckets read a one-canvas export: nothing new is written for it."""
    detect_manifest().write(tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert not {"canvases", "onnx_data"} & set(data)
    assert "test_scale" not in data["preprocess"]
    again = read_manifest(tmp_path)
    assert isinstance(again, DetectManifest)
    assert again.test_scale == (64, 64)  # the canvas's own sides
