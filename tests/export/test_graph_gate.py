"""The gate must catch each kind of graph TensorRT would reject or run poorly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.graph_gate import GraphGateError, check_graph, inspect_graph, tensorrt_supported_ops


def _model(
    nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], batch: str | int = "batch"
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_supported_list_is_read_from_the_shipped_file() -> None:
    ops = tensorrt_supported_ops()
    assert {"Gather", "LayerNormalization", "MatMul", "Softmax"} <= ops
    assert "Col2Im" not in ops


def test_a_clean_graph_passes() -> None:
    index = numpy_helper.from_array(np.array([1, 0], dtype=np.int64), "index")
    report = check_graph(_model([helper.make_node("Gather", ["x", "index"], ["y"], axis=1)], [index]))
    assert report.node_count == 1


def test_runtime_gather_index_and_unfolded_constants_are_caught() -> None:
    a = numpy_helper.from_array(np.ones(4, dtype=np.float32), "a")
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["x", "shape"], ["g"], axis=1),
        helper.make_node("Mul", ["a", "a"], ["aa"]),
        helper.make_node("Add", ["g", "aa"], ["y"]),
    ]
    problems = inspect_graph(_model(nodes, [a])).problems
    assert any("Gather" in p and "computed at run time" in p for p in problems)
    assert any("Mul" in p and "not folded" in p for p in problems)


@pytest.mark.parametrize("op", ["NonZero", "ScatterND", "Col2Im"])
def test_forbidden_and_unsupported_ops_are_caught(op: str) -> None:
    with pytest.raises(GraphGateError, match=op):
        check_graph(_model([helper.make_node(op, ["x"], ["y"])], []))


def test_a_fixed_batch_is_caught() -> None:
    problems = inspect_graph(_model([helper.make_node("Relu", ["x"], ["y"])], [], batch=2)).problems
    assert problems == ["the input's batch dimension is not symbolic"]
