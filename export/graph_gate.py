"""The graph gate: checks every exported ONNX graph can be parsed and optimised by TensorRT.

Rules (each one a failure, listed together):
- every op type is in TensorRT's ONNX parser support list (`data/trt_onnx_ops.txt`);
- none of the ops that make graphs dynamic or slow on TensorRT (Loop, If, NonZero, ScatterND, ...);
- every Gather index, and the shape/axes/pads inputs of Reshape, Slice, Pad, ReduceMean,
  Unsqueeze, is an initializer (static gathers, nothing computed at run time);
- constant folding is complete: no node computes from initializers alone (so every
  relative-position bias is one folded constant);
- one input with a symbolic batch dimension: float32, or uint8 that goes straight into a Cast
  (TensorRT takes UINT8 only as a network input or output).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import onnx

FORBIDDEN_OPS = frozenset(
    {"Loop", "If", "Scan", "NonZero", "ScatterND", "ScatterElements", "Col2Im", "SequenceConstruct"}
)
# Inputs (by position) that must be initializers for each op type.
STATIC_INPUTS = {
    "Gather": (1,),
    "Reshape": (1,),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 2, 3),
    "ReduceMean": (1,),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
}


class GraphGateError(Exception):
    """The exported graph breaks a rule of the gate."""


@dataclass
class GraphReport:
    node_count: int
    op_counts: dict[str, int]
    opset: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@cache
def tensorrt_supported_ops() -> frozenset[str]:
    text = resources.files("export").joinpath("data", "trt_onnx_ops.txt").read_text(encoding="utf-8")
    ops = (line.split("#", 1)[0].strip() for line in text.splitlines() if not line.lstrip().startswith("#"))
    return frozenset(op for op in ops if op)


def inspect_graph(model: onnx.ModelProto) -> GraphReport:
    graph = model.graph
    ops = Counter(node.op_type for node in graph.node)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    report = GraphReport(node_count=len(graph.node), op_counts=dict(sorted(ops.items())), opset=opset)
    problems = report.problems
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}

    if opset < 17:
        problems.append(f"opset {opset} < 17 (LayerNormalization is native only from 17)")
    unsupported = sorted(set(ops) - tensorrt_supported_ops())
    if unsupported:
        problems.append(f"op types TensorRT's ONNX parser does not support: {', '.join(unsupported)}")
    forbidden = sorted(set(ops) & FORBIDDEN_OPS)
    if forbidden:
        problems.append(f"forbidden op types: {', '.join(forbidden)}")
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        for position in STATIC_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] and node.input[position] not in constants:
                problems.append(f"{node.op_type} {node.name!r}: input {position} is computed at run time")
        if node.input and all(name in constants for name in node.input if name):
            problems.append(f"{node.op_type} {node.name!r}: computes from constants only (not folded)")
    if len(graph.input) != 1:
        problems.append(f"expected one input, found {len(graph.input)}")
    else:
        dims = graph.input[0].type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            problems.append("the input's batch dimension is not symbolic")
        given = graph.input[0]
        if given.type.tensor_type.elem_type == onnx.TensorProto.UINT8:  # export.uint8: cast at once
            users = [n for n in graph.node if given.name in n.input]
            if not users or any(n.op_type != "Cast" for n in users):
                problems.append("a uint8 input must go straight into Cast (TensorRT takes UINT8 only so)")
        elif given.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append("the input is neither float32 nor uint8")
    return report


def check_graph(model: onnx.ModelProto) -> GraphReport:
    """Inspect and raise `GraphGateError` listing every problem; returns the report otherwise."""
    report = inspect_graph(model)
    if not report.ok:
        shown = report.problems[:20] + ([f"... {len(report.problems) - 20} more"] if len(report.problems) > 20 else [])
        raise GraphGateError("the ONNX graph fails the TensorRT gate:\n  " + "\n  ".join(shown))
    return report
