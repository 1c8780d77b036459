"""The verification rules on their own: the fp16 gates of both tasks (with outputs made up to sit on
either side of each bound) and the pruning that turns a verification graph into the served one."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import keep_outputs
from export.tasks.classify import compare_logits
from export.tasks.detect import DetectTask
from export.verify import VerificationError
from focal.detection import FocalRetinaNet, create_detector
from tests.support import micro_kwargs


def test_a_near_tie_may_flip_but_a_clear_winner_may_not() -> None:
    reference = {1: np.asarray([[10.0, 9.95, 0.0]])}  # scale 10: a near-tie is within 0.1
    tie = compare_logits(reference, {1: np.asarray([[9.96, 9.97, 0.0]])}, near_tie=1e-2)
    assert (tie["top1_agreement"], tie["top1_flips"]) == (0.0, 0)
    # fp16 picks a class 0.15 (1.5% of the scale) below the best: a real flip, although the best two tie.
    third = compare_logits({1: np.asarray([[10.0, 9.95, 9.85]])}, {1: np.asarray([[9.93, 9.93, 9.94]])}, 1e-2)
    assert third["top1_flips"] == 1
    assert third["relative_diff"] == pytest.approx(0.009)
    clear = compare_logits({1: np.asarray([[10.0, 5.0, 0.0]])}, {1: np.asarray([[5.0, 10.0, 0.0]])}, 1e-2)
    assert clear["top1_flips"] == 1
    nan = compare_logits(reference, {1: np.asarray([[np.nan, 0.0, 0.0]])}, 1e-2)
    assert nan["max_abs_diff"] == float("inf")


@pytest.fixture(scope="module")
def detector() -> FocalRetinaNet:
    return create_detector("focal_tiny", (64, 64), **micro_kwargs())


def _run(detector: FocalRetinaNet, raw_shift: float = 0.0, score_shift: float = 0.0, nan: bool = False) -> Any:
    """What `run_onnx` would give for one graph: per batch size [detections, logits_p3, deltas_p3, ...]."""
    rows = sum(detector.level_candidates)
    outputs = {}
    for b in (1, 3):
        detections = np.zeros((b, rows, 6), np.float32)
        detections[..., 4] = 0.5 + score_shift
        if nan:
            detections[0, 0, 0] = np.nan
        raw = [np.full((b, 10, 80), -4.6 + raw_shift, np.float32), np.zeros((b, 10, 4), np.float32)]
        outputs[b] = [detections, *raw]
    return outputs


@pytest.mark.parametrize(
    ("fp16", "message"),
    [
        ({}, None),
        ({"raw_shift": 0.04}, None),  # 0.9% of the head outputs' scale 4.6
        ({"raw_shift": 0.06}, r"head outputs max \|diff\| 0.06 is 0.013 of their scale"),
        ({"score_shift": 0.02}, r"detections disagree with fp32: candidate scores max \|diff\| 0.02"),
        ({"nan": True}, "not finite"),
    ],
)
def test_the_detection_fp16_gate(
    fp16: dict[str, Any], message: str | None, detector: FocalRetinaNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    graphs: dict[str, Any] = {"fp32": _run(detector), "fp16": _run(detector, **fp16)}
    monkeypatch.setattr("export.tasks.detect.run_onnx", lambda graph, inputs: graphs[graph])
    verify = DetectTask().verify_fp16
    if message is None:
        assert verify(detector, "fp32", "fp16", (64, 64))["checked_with"] == "onnxruntime CPU"
    else:
        with pytest.raises(VerificationError, match=message):
            verify(detector, "fp32", "fp16", (64, 64))


def _two_output_graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("kept", "extra")]
    nodes = [
        helper.make_node("Add", ["x", "one"], ["kept"], name="add"),
        helper.make_node("Mul", ["x", "two"], ["doubled"], name="mul"),
        helper.make_node("Relu", ["doubled"], ["extra"], name="relu"),
    ]
    constants = [numpy_helper.from_array(np.full(4, v, np.float32), name) for v, name in ((1, "one"), (2, "two"))]
    graph = helper.make_graph(nodes, "g", [x], outputs, constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_pruning_to_the_served_outputs_keeps_exactly_what_they_need() -> None:
    full = _two_output_graph()
    slim = keep_outputs(full, ["kept"])
    assert [o.name for o in slim.graph.output] == ["kept"]
    assert [n.name for n in slim.graph.node] == ["add"]
    assert [i.name for i in slim.graph.initializer] == ["one"]
    assert len(full.graph.node) == 3  # the verification graph is left as it was
    with pytest.raises(ValueError, match=r"no output\(s\) \['nope'\]"):
        keep_outputs(full, ["nope"])
