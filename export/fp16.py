"""fp32 ONNX -> fp16 ONNX: weights and compute in fp16, the input and outputs kept fp32.

LayerNormalization and Softmax stay in fp32 (with casts around them): fp16
LayerNorm overflow is the most reported TensorRT transformer accuracy problem,
and the attention softmax sees large logits and the masked keys' -1e4
(`focal.geometry.MASK_VALUE`), whose exponentials need fp32's range.

The result is not trusted for being converted: every task verifies it against
the fp32 graph and fails the export beyond a bound (`export.tasks`).

In a detection graph everything after the per-level TopK (index arithmetic,
anchor gathers, box decoding) stays fp32 too: canvas coordinates need more
than fp16's 11 bits, and it is a few thousand rows, so fp32 costs nothing.
"""

from __future__ import annotations

import warnings

import onnx
from onnxconverter_common import float16

from export.onnx_export import fold_constants

FP32_OPS = ("LayerNormalization", "Softmax")


def convert_to_fp16(fp32: onnx.ModelProto) -> onnx.ModelProto:
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    tail = _after_topk(fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about values clamped to the fp16 range
        model = float16.convert_float_to_float16(fp32, keep_io_types=True, op_block_list=block, node_block_list=tail)
    model = fold_constants(model)  # the casts of fp32 LayerNorm weights back from fp16
    layer_norms = {n.name for n in fp32.graph.node if n.op_type == "LayerNormalization"}
    _restore_fp32_initializers(fp32, model, layer_norms | set(tail))
    if tail:
        _drop_fp16_round_trips(model, set(tail))
    for before, after in zip(fp32.graph.output, model.graph.output, strict=True):
        if before.type.tensor_type.elem_type != after.type.tensor_type.elem_type:
            raise RuntimeError(f"fp16 conversion changed the type of output {before.name}")
    onnx.checker.check_model(model, full_check=True)
    return model


def _restore_fp32_initializers(fp32: onnx.ModelProto, fp16: onnx.ModelProto, nodes: set[str]) -> None:
    """The converter rounds every initializer to fp16, also those of the nodes it keeps in fp32
    (LayerNorm scales up to ~5e-4 off, anchor sizes up to 0.4 px); for the named nodes, put the
    original fp32 values back (node names and input positions survive the conversion)."""
    originals = {init.name: init for init in fp32.graph.initializer}
    fp32_inputs = {n.name: list(n.input) for n in fp32.graph.node if n.name in nodes}
    converted = {init.name: init for init in fp16.graph.initializer}
    for node in fp16.graph.node:
        if node.name not in fp32_inputs:
            continue
        for source, target in zip(fp32_inputs[node.name], node.input, strict=False):
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


def _drop_fp16_round_trips(model: onnx.ModelProto, tail: set[str]) -> None:
    """Between two nodes it was told to keep in fp32, the converter still casts values to fp16 and
    back (and casts a blocked node's graph output to fp16). Remove those casts: the tail then
    really is fp32 end to end (an anchor coordinate of 128.4587 stays that, not 128.5)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name: o for o in graph.output}

    def cast_to(node: onnx.NodeProto | None) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return int(next(a.i for a in node.attribute if a.name == "to"))

    def fp32_source(name: str) -> bool:
        node = producer.get(name)
        return node is not None and (node.name in tail or cast_to(node) == onnx.TensorProto.FLOAT)

    replace: dict[str, str] = {}
    dropped: set[int] = set()
    for node in graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT16 or not fp32_source(node.input[0]):
            continue
        source, value = node.input[0], node.output[0]
        users = consumers.get(value, [])
        if value in outputs and not users:
            src_node = producer[source]
            src_node.output[list(src_node.output).index(source)] = value  # the output keeps its name
            replace[source] = value
            outputs[value].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            dropped.add(id(node))
        elif (
            value not in outputs
            and users
            and all(cast_to(user) == onnx.TensorProto.FLOAT and user.output[0] not in outputs for user in users)
        ):
            for user in users:
                replace[user.output[0]] = source
                dropped.add(id(user))
            dropped.add(id(node))
    kept = [node for node in graph.node if id(node) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            while name in replace:
                name = replace[name]
            node.input[i] = name
    del graph.node[:]
    graph.node.extend(kept)
