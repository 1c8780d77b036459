"""The int8 CPU graph (`python -m export --int8`): onnxruntime's dynamic quantization of the fp32 graph.

Dynamic: the weights of every MatMul and Gemm whose second operand is a constant (the
linear layers, which take over half of a Focal model's CPU time; not the window-pooling
fc, whose weight is the first operand) are stored as int8, per
output channel, and each activation is quantized on the fly from its own range, so no
calibration images are needed and no range can be calibrated wrong. Convolutions, the
attention products (activation by activation), LayerNorm, Softmax and Gelu stay fp32.
The graph uses onnxruntime's integer ops (MatMulInteger, DynamicQuantizeLinear): it is
for onnxruntime on CPUs, not for TensorRT, and the graph gate does not apply to it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
from pathlib import Path

QUANTIZED_OPS = ["MatMul", "Gemm"]
QUANTIZATION_METHOD = "onnxruntime dynamic quantization of MatMul and Gemm with a constant weight, int8 per channel"
# x86 instruction sets with int8 dot products; without them onnxruntime's u8 x s8 products can saturate
# (onnxruntime's quantization docs), so an int8 graph verified on one CPU may differ a little on another.
_INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    """The CPU model and whether it has int8 dot-product instructions (recorded with the verification)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    model = fields.get("model name\t", platform.machine()).strip()
    flags = set(fields.get("flags\t\t", "").split())
    found = [flag for flag in _INT8_DOT_PRODUCT_FLAGS if flag in flags]
    return f"{model}, int8 dot products: {', '.join(found) if found else 'none'}"


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
