"""The int8 CPU graph (`python -m export --int8`): onnxruntime's dynamic quantization of the fp32 graph.

Dynamic: the weights of every MatMul and Gemm (the linear layers, which take over
half of a Focal model's CPU time) are stored as int8, per output channel, and each
activation is quantized on the fly from its own range, so no calibration images are
needed and no range can be calibrated wrong. Convolutions, attention products,
LayerNorm, Softmax and Gelu stay fp32. The graph uses onnxruntime's integer ops
(MatMulInteger, DynamicQuantizeLinear): it is for onnxruntime on CPUs, not for
TensorRT, and the graph gate does not apply to it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

QUANTIZED_OPS = ["MatMul", "Gemm"]


def quantize_int8(fp32: Path, out: Path) -> None:
    """Write the dynamically quantized int8 version of the fp32 graph at `fp32` to `out`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer advises pre-processing on the root logger, every time
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_dynamic(
                fp32,
                out,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=QUANTIZED_OPS,
            )
    finally:
        root.setLevel(level)
