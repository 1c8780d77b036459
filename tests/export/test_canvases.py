"""A detector's canvases: the sets at mmdetection's scales, the options, and an export with three
canvases (`tests/conftest.py: bucket_export`): one graph per canvas around one shared weights file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from export.canvases import WEIGHTS_DATA, canvas_set, mmdetection_input, parse_canvases, parse_scale
from export.options import ExportOptions
from export.pipeline import run_export
from export.shared_weights import share_weights
from manifest import DetectManifest, keep_ratio_size, read_manifest, sha256_file
from tests.conftest import BUCKET_CANVASES, BUCKET_SCALE, DetectExport


def test_the_canvas_sets_are_mmdetections_input_sizes_of_common_photos() -> None:
    """By hand: at the paper's 1333x800 a 4:3 photo becomes 1067x800 (padded 800x1088), 16:9 1333x750
    (768x1344), 3:2 1200x800 (800x1216), 1:1 800x800; and 800x1344 / 1344x800 hold any image."""
    assert keep_ratio_size(4032, 3024, (1333, 800)) == (1067, 800)
    assert keep_ratio_size(1920, 1080, (1333, 800)) == (1333, 750)
    assert mmdetection_input(1920, 1080, (1333, 800)) == (768, 1344)
    assert canvas_set((1333, 800)) == [(1344, 800), (800, 1344), (1344, 768), (768, 1344), (1216, 800),
                                       (800, 1216), (1088, 800), (800, 1088), (800, 800)]  # fmt: skip
    assert canvas_set((640, 640)) == [(640, 640), (640, 480), (480, 640), (640, 448), (448, 640), (640, 384),
                                      (384, 640)]  # fmt: skip


def test_canvas_and_scale_arguments_are_parsed_or_refused() -> None:
    assert parse_canvases("480x640, 640X480") == [(480, 640), (640, 480)]
    assert parse_scale("1333x800") == (1333, 800)
    for bad in ("480", "480x", "x640", "480x640x3", "a x b"):
        with pytest.raises(ValueError, match="is not HxW"):
            parse_canvases(bad)
    for bad in ("800x1333", "1333", "0x0"):
        with pytest.raises(ValueError, match="LONGxSHORT"):
            parse_scale(bad)


def test_the_default_detector_export_is_the_640_set_and_names_its_folder_so() -> None:
    opts = ExportOptions(variant="focal_tiny", task="detect", random_init=True)
    assert opts.sizes == canvas_set((640, 640))
    assert opts.hooks.test_scale(opts) == (640, 640)
    assert str(opts.default_out()).endswith("focal_tiny-detect-canvases-640-fp32-random-init")
    one = ExportOptions(variant="focal_tiny", task="detect", random_init=True, canvases=[(640, 640)])
    assert (one.sizes, one.hooks.test_scale(one)) == ([(640, 640)], None)
    assert str(one.default_out()).endswith("focal_tiny-detect-640x640-fp32-random-init")


def test_each_canvas_has_its_graph_and_all_share_one_weights_file(bucket_export: DetectExport) -> None:
    folder, manifest = bucket_export.folder, bucket_export.manifest
    assert read_manifest(folder).model_dump(mode="json") == manifest.model_dump(mode="json")
    assert manifest.canvas_sizes == [(288, 224), (224, 288), (224, 224)]  # largest first
    assert manifest.test_scale == BUCKET_SCALE
    assert json.loads((folder / "manifest.json").read_text())["preprocess"]["test_scale"] == list(BUCKET_SCALE)
    assert manifest.onnx_data == WEIGHTS_DATA
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["labels.txt", "manifest.json", "model.224x224.fp32.onnx", "model.224x288.fp32.onnx",
                     "model.288x224.fp32.onnx", WEIGHTS_DATA]  # fmt: skip
    assert set(manifest.sha256) == set(names) - {"manifest.json"}
    assert all(manifest.sha256[n] == sha256_file(folder / n) for n in manifest.sha256)
    sizes = {name: (folder / name).stat().st_size for name in names}
    assert max(sizes[n] for n in manifest.onnx_names if n.endswith(".onnx")) < 2**20  # the weights are elsewhere
    separate = 0
    rng = np.random.default_rng(0)
    for view in manifest.canvas_views():
        graph = onnx.load(str(folder / view.onnx_fp32))  # reads the shared file too
        separate += sum(t.ByteSize() for t in graph.graph.initializer)
        assert view.verification["fp32_vs_torch"]["selection_agreement"] >= 0.99
        session = ort.InferenceSession(str(folder / view.onnx_fp32), providers=["CPUExecutionProvider"])
        rows = session.run(None, {"pixels": rng.standard_normal((2, 3, *view.input_size), dtype=np.float32)})[0]
        assert rows.shape == (2, view.output.sample_shape[0], 6)
    assert sizes[WEIGHTS_DATA] < 0.5 * separate  # each tensor the canvases share is stored once
    for line in ("PyTorch model [224x288]", "verification [288x224]", "graphs keep their weights in weights.data"):
        assert line in bucket_export.log


def test_an_unchanged_bucket_export_is_reused_and_a_changed_one_leaves_no_stale_graphs(
    bucket_export: DetectExport, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lines: list[str] = []
    inputs = bucket_export.manifest.inputs
    opts = ExportOptions(
        variant="focal_tiny",
        task="detect",
        weights=bucket_export.checkpoint,
        canvases=BUCKET_CANVASES,
        test_scale=BUCKET_SCALE,
        labels=bucket_export.folder / "labels.txt",
        model_kwargs=inputs["model_kwargs"],
        out=bucket_export.folder,
    )
    again = run_export(opts, log=lines.append)
    assert isinstance(again, DetectManifest)
    assert "unchanged inputs and artifacts (sha256 verified): reusing" in "\n".join(lines)
    assert again.canvas_sizes == bucket_export.manifest.canvas_sizes
    copy = tmp_path_factory.mktemp("bucket_copy")
    for path in bucket_export.folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    opts.out, opts.canvases, opts.test_scale = copy, [(224, 224)], None
    one = run_export(opts, log=lambda _: None)
    assert isinstance(one, DetectManifest)
    assert sorted(p.name for p in copy.iterdir()) == ["labels.txt", "manifest.json", "model.fp32.onnx"]
    assert one.canvases == []
    assert one.onnx_data is None


def test_shared_weights_keep_every_tensor_and_store_each_once(tmp_path: Path) -> None:
    """Two graphs with a tensor in common (under different names) and one each of their own: after
    sharing, each graph reads back exactly its tensors, the common one is stored once, small tensors
    stay inline, and a graph named twice or already sharing is refused."""
    rng = np.random.default_rng(0)
    common, own_a, own_b = (rng.standard_normal(1000).astype(np.float32) for _ in range(3))
    small = np.arange(4, dtype=np.int64)

    def graph(name: str, tensors: dict[str, np.ndarray]) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
        nodes = [onnx.helper.make_node("Identity", [k], [f"out_{k}"]) for k in tensors]
        outputs = [onnx.helper.make_tensor_value_info(f"out_{k}", onnx.TensorProto.UNDEFINED, None) for k in tensors]
        model = onnx.helper.make_model(onnx.helper.make_graph(nodes, name, [], outputs, inits))
        onnx.save_model(model, str(tmp_path / f"{name}.onnx"))
        return model

    originals: dict[str, dict[str, np.ndarray]] = {
        "a": {"w": common, "a_only": own_a, "idx": small},
        "b": {"renamed_w": common, "b_only": own_b},
    }
    for name, tensors in originals.items():
        graph(name, tensors)
    report = share_weights(tmp_path, ["a.onnx", "b.onnx"], "weights.data")
    assert report.total_bytes == 4 * 4000
    assert (tmp_path / "weights.data").stat().st_size <= 2 * 4096 + 4000  # three tensors, page-aligned: not four
    for name, tensors in originals.items():
        loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"{name}.onnx")).graph.initializer}
        assert loaded.keys() == tensors.keys()
        for key, value in tensors.items():
            np.testing.assert_array_equal(loaded[key], value)
    inline = onnx.load(str(tmp_path / "a.onnx"), load_external_data=False).graph.initializer
    assert [t.name for t in inline if t.data_location != onnx.TensorProto.EXTERNAL] == ["idx"]
    with pytest.raises(ValueError, match="already keeps weights"):
        share_weights(tmp_path, ["a.onnx"], "other.data")
    with pytest.raises(ValueError, match="named twice"):
        share_weights(tmp_path, ["a.onnx", "a.onnx"], "other.data")
