"""fp32 ONNX -> fp16 ONNX: weights and compute in fp16, the input and outputs kept fp32.

LayerNormalization and Softmax stay in fp32 (with casts around them): fp16
LayerNorm overflow is the most reported TensorRT transformer accuracy problem,
and the attention softmax sees the -100 masks and large logits.
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
        model = float16.convert_float_to_float16(fp32, keep_io_types=True, op_block_list=block)
    model = fold_constants(model)  # the casts of fp32 LayerNorm weights back from fp16
    onnx.save_model(model, str(path))
    return model
