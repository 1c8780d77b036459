"""fp32 ONNX -> fp16 ONNX: weights and compute in fp16, the input and outputs kept fp32.

LayerNormalization and Softmax stay in fp32 (with casts around them): fp16
LayerNorm overflow is the most reported TensorRT transformer accuracy problem,
and the attention softmax sees the -100 masks and large logits.

In a detection graph everything after the per-level TopK (index arithmetic,
anchor gathers, box decoding) stays fp32 too: canvas coordinates need more
than fp16's 11 bits, and it is a few thousand rows, so fp32 costs nothing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
from onnxconverter_common import float16

from export.onnx_export import fold_constants

FP32_OPS = ("LayerNormalization", "Softmax")


def convert_to_fp16(fp32: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about values clamped to the fp16 range
        model = float16.convert_float_to_float16(
            fp32, keep_io_types=True, op_block_list=block, node_block_list=_after_topk(fp32)
        )
    model = fold_constants(model)  # the casts of fp32 LayerNorm weights back from fp16
    _restore_layernorm_weights(fp32, model)
    onnx.save_model(model, str(path))
    return model


def _restore_layernorm_weights(fp32: onnx.ModelProto, fp16: onnx.ModelProto) -> None:
    """The converter rounds every initializer to fp16, also the scale/bias of the LayerNorms it keeps
    in fp32 (up to ~5e-4 off); put the original fp32 values back (node names survive the conversion)."""
    originals = {init.name: init for init in fp32.graph.initializer}
    fp32_inputs = {n.name: list(n.input) for n in fp32.graph.node if n.op_type == "LayerNormalization"}
    converted = {init.name: init for init in fp16.graph.initializer}
    for node in fp16.graph.node:
        if node.op_type != "LayerNormalization" or node.name not in fp32_inputs:
            continue
        for source, target in zip(fp32_inputs[node.name][1:], node.input[1:], strict=False):
            init = converted.get(target)
            if source in originals and init is not None and init.data_type == onnx.TensorProto.FLOAT:
                init.CopyFrom(originals[source])
                init.name = target


def _after_topk(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes fed, directly or not, by a TopK (the detection tail)."""
    tainted: set[str] = set()
    names: list[str] = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "TopK":
            tainted.update(node.output)
        elif any(name in tainted for name in node.input):
            tainted.update(node.output)
            names.append(node.name)
    return names
