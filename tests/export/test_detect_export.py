"""`python -m export --task detect`: the manifest, the graphs (the fp16 one keeps its tail in fp32),
and the checkpoints a detector export accepts. The export is the constructed micro detector of
`tests/conftest.py` (an mmdetection checkpoint given with --weights, with --fp16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch

from export.graph_gate import check_graph
from export.options import ExportOptions
from export.pipeline import run_export
from focal import FocalTransformer
from focal.checkpoint import CheckpointError
from focal.labels import coco_labels
from manifest import read_manifest
from tests.conftest import DETECT_CANVAS, DetectExport
from tests.support import load_official_case, micro_kwargs


def test_the_manifest_describes_the_detector(detect_export: DetectExport) -> None:
    folder, manifest = detect_export.folder, detect_export.manifest
    assert read_manifest(folder).model_dump(mode="json") == manifest.model_dump(mode="json")
    assert (manifest.task, manifest.input_size, manifest.num_classes) == ("detect", DETECT_CANVAS, 80)
    assert (manifest.weights_role, manifest.random_init) == ("detector", False)
    assert manifest.weights.file == detect_export.checkpoint.name
    assert (folder / manifest.labels).read_text().splitlines() == list(coco_labels())
    assert (manifest.preprocess.resize, manifest.preprocess.canvas) == ("letterbox", DETECT_CANVAS)
    detection = manifest.detection
    assert detection.anchors.per_location == 9
    assert detection.anchors.strides == [8, 16, 32, 64, 128]
    assert [level.size for level in detection.levels] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert [level.candidates for level in detection.levels] == [1000, 1000, 1000, 1000, 720]
    assert detection.postprocess.model_dump() == {
        "score_threshold": 0.05,
        "nms": "class-aware, greedy",
        "iou_threshold": 0.5,
        "max_detections": 100,
    }
    assert manifest.output.model_dump() == {"name": "detections", "dtype": "float32", "shape": ["batch", 4720, 6]}
    assert manifest.batch.model_dump() == {"min": 1, "opt": 2, "max": 8}
    for name in (manifest.onnx_fp32, manifest.onnx):  # the same TensorRT op gate as classification
        graph = onnx.load(str(folder / name))
        check_graph(graph)
        assert [o.name for o in graph.graph.output] == ["detections"]  # the verification outputs are gone
    assert sorted(p.name for p in folder.iterdir()) == ["labels.txt", "manifest.json", "model.fp16.onnx",
                                                        "model.fp32.onnx"]  # fmt: skip
    assert set(manifest.verification) == {"fp32_vs_torch", "fp16_vs_fp32"}
    assert manifest.verification["fp16_vs_fp32"]["raw_max_abs_diff"] <= 1e-2 * manifest.verification[
        "fp16_vs_fp32"]["raw_scale"]  # fmt: skip


def test_the_fp16_detection_graph_keeps_its_output_and_box_decoding_in_fp32(detect_export: DetectExport) -> None:
    folder, manifest = detect_export.folder, detect_export.manifest
    graph = onnx.load(str(folder / manifest.onnx))
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = ort.InferenceSession(str(folder / manifest.onnx), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(3).standard_normal((2, 3, *DETECT_CANVAS), dtype=np.float32)
    rows = session.run(None, {"pixels": pixels})[0]
    assert rows.dtype == np.float32
    # Decoded in fp32, most box coordinates are not fp16 numbers (anchor sizes like 40.317).
    boxes = rows[..., :4]
    inner = boxes[(boxes > 0) & (boxes < DETECT_CANVAS[0])]
    assert np.mean(inner.astype(np.float16).astype(np.float32) != inner) > 0.5
    # The constants of the tail (anchor centres and sizes, clamps) are the fp32 graph's, bit for bit.
    fp32 = onnx.load(str(folder / manifest.onnx_fp32))
    values = {init.name: onnx.numpy_helper.to_array(init) for init in fp32.graph.initializer}
    converted = {init.name: onnx.numpy_helper.to_array(init) for init in graph.graph.initializer}
    fp32_nodes = {node.name: node for node in fp32.graph.node}
    checked = 0
    for node in graph.graph.node:
        if node.op_type in ("GatherND", "Clip", "Min", "Max") and node.name in fp32_nodes:
            for source, target in zip(fp32_nodes[node.name].input, node.input, strict=False):
                if source in values and values[source].dtype == np.float32:
                    assert np.array_equal(converted[target], values[source]), (node.name, source)
                    checked += 1
    assert checked >= 20  # 5 levels x (2 anchor gathers + clamps and clips)


def test_a_classification_checkpoint_given_as_detector_weights_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "classifier.pth"
    torch.save({"model": FocalTransformer(**load_official_case("micro_224").kwargs).state_dict()}, path)
    opts = ExportOptions(
        variant="focal_tiny",
        task="detect",
        weights=path,
        canvases=[(64, 64)],
        model_kwargs=micro_kwargs(),
        out=tmp_path / "out",
    )
    with pytest.raises(CheckpointError, match="use --backbone-weights"):
        run_export(opts, log=lambda _: None)
    backbone = ExportOptions(**{**vars(opts), "weights": None, "backbone_weights": path})
    assert backbone.weights_role == "backbone"
