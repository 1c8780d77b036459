"""PyTorch -> ONNX: the model exported once with a symbolic batch dimension, then constant-folded.

The exporter is torch.export + onnxscript (`torch.onnx.export(dynamo=True)`),
which gives a clean opset-20 graph (native LayerNormalization and Gelu): the gathers use the model's constant index
buffers, and its optimiser folds every relative-position bias and mask into one
initializer per block. The batch used for tracing (`TRACE_BATCH`) is never one
that verification uses.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxscript.optimizer
import torch
from torch import nn

from export.options import ExportError
from focal.model import FUSED_BIAS_MAX_ELEMENTS, GatheredWindowAttention

OPSET = 20
TRACE_BATCH = 2
INPUT_NAME = "pixels"
PROTOBUF_LIMIT_BYTES = 2**31  # one ONNX file holds at most this much (weights and folded constants)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs and warns a lot (torchvision ops it skips, deprecations); keep progress readable."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(
    model: nn.Module,
    input_size: tuple[int, int],
    output_names: list[str],
    max_batch: int = 1024,
) -> onnx.ModelProto:
    """Export `model` (eval mode, fp32): the constant-folded graph with a symbolic batch axis, in memory."""
    model = model.eval()
    largest, total = _folded_biases(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if weights + total > 0.9 * PROTOBUF_LIMIT_BYTES:
        raise ExportError(
            f"at {input_size[0]}x{input_size[1]} the graph would hold {(weights + total) / 2**30:.1f} GiB of weights "
            f"and folded attention biases ({total / 2**30:.1f} GiB), beyond what one ONNX file can hold (2 GiB); "
            "export a smaller input size"
        )
    example = torch.randn(TRACE_BATCH, 3, *input_size)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, TRACE_BATCH + 1))
    with _quiet_exporter(), torch.inference_mode():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_shapes=({0: batch},),
            optimize=True,
            external_data=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    proto = fold_constants(program.model_proto, max(2 * FUSED_BIAS_MAX_ELEMENTS, largest))
    _rename_batch_dim(proto)
    return proto


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))


def _folded_biases(model: nn.Module) -> tuple[int, int]:
    """(elements of the largest, bytes of all) attention biases the graph will hold as folded constants."""
    with torch.inference_mode():
        sizes = [m.attention_bias().numel() for m in model.modules() if isinstance(m, GatheredWindowAttention)]
    return max(sizes, default=0), 4 * sum(sizes)


def fold_constants(proto: onnx.ModelProto, limit: int = 2 * FUSED_BIAS_MAX_ELEMENTS) -> onnx.ModelProto:
    """Fold every subgraph that depends on constants only.

    The exporter's own pass stops at small size limits and leaves the bias tables
    and index reshapes unfolded; fold up to `limit` elements, the largest constant a
    block has (Focal's fused bias and mask, or Focal-fast's per-window bias).
    """
    with _quiet_exporter():
        return onnxscript.optimizer.optimize(proto, input_size_limit=limit, output_size_limit=limit)


def _rename_batch_dim(proto: onnx.ModelProto) -> None:
    """Name the symbolic batch dimension 'batch' on the input and outputs (the exporter may call it s0)."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"


def keep_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the graph with only the named outputs, without the nodes and initializers only the
    others needed. Nothing else changes: the kept nodes are the very nodes that were verified."""
    missing = set(names) - {o.name for o in proto.graph.output}
    if missing:
        raise ValueError(f"the graph has no output(s) {sorted(missing)}")
    slim = onnx.ModelProto()
    slim.CopyFrom(proto)
    graph = slim.graph
    kept_outputs = [o for o in graph.output if o.name in names]
    needed = {o.name for o in kept_outputs}
    nodes = []
    for node in reversed(graph.node):  # topologically sorted: walk back from the outputs
        if any(name in needed for name in node.output):
            nodes.append(node)
            needed.update(name for name in node.input if name)
    del graph.output[:]
    graph.output.extend(kept_outputs)
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    for field in (graph.initializer, graph.value_info):
        kept = [item for item in field if item.name in needed]
        del field[:]
        field.extend(kept)
    onnx.checker.check_model(slim)  # e.g. a graph whose nodes were not in topological order
    return slim
