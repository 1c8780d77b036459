"""Tensors of the Open Inference Protocol (KServe v2) as NumPy arrays, both ways, for both wire forms.

- JSON: `data` is the tensor's elements flattened in row-major order (nested lists are accepted
  and flattened). `BYTES` elements in JSON are strings; since encoded images are not text, this
  service reads each `BYTES` string as **base64** (documented in the model metadata).
- Raw bytes (Triton's binary tensor data extension over REST, `raw_input_contents` and
  `raw_output_contents` over gRPC): little-endian elements in row-major order; a `BYTES` tensor
  is each element as a 4-byte little-endian length followed by its bytes.

Every problem is a `TensorError` whose message names the tensor (the protocols answer 400 /
INVALID_ARGUMENT). Pure functions, no web framework.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
_LENGTH = struct.Struct("<I")


class TensorError(ValueError):
    """A tensor that does not parse: wrong shape, datatype, element count or encoding."""


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == np.object_:
        return BYTES
    for name, dtype in DTYPES.items():
        if array.dtype == dtype:
            return name
    raise TypeError(f"no protocol datatype for {array.dtype}")


class TooManyElements(TensorError):
    """A `BYTES` tensor with more elements than the caller allows (checked before any is decoded)."""


def check_shape(
    name: str, shape: Sequence[Any], datatype: str | None = None, max_bytes_elements: int | None = None
) -> tuple[int, ...]:
    """The shape as integers; `TooManyElements` when a `BYTES` tensor would hold more than
    `max_bytes_elements` (each element is a Python object: the limit comes before any is made)."""
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TensorError(f"input {name!r}: shape {list(shape)} must be non-negative integers")
    dims = tuple(int(d) for d in shape)
    count = math.prod(dims)
    if datatype == BYTES and max_bytes_elements is not None and count > max_bytes_elements:
        raise TooManyElements(f"input {name!r}: {count} images in one request; the limit is {max_bytes_elements}")
    return dims


def reshape(name: str, array: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    try:
        return array.reshape(dims)
    except ValueError as exc:  # e.g. a zero next to dimensions too large for NumPy
        raise TensorError(f"input {name!r}: shape {list(dims)}: {exc}") from None


def from_raw(
    name: str, datatype: str, shape: Sequence[int], raw: bytes, max_bytes_elements: int | None = None
) -> np.ndarray:
    """A tensor from its raw bytes (binary extension, gRPC raw contents)."""
    dims = check_shape(name, shape, datatype, max_bytes_elements)
    count = math.prod(dims)
    if datatype == BYTES:
        return reshape(name, _bytes_elements(name, raw, count), dims)
    dtype = _dtype(name, datatype)
    if len(raw) != count * dtype.itemsize:
        raise TensorError(
            f"input {name!r}: {len(raw)} bytes of data for shape {list(dims)} of {datatype} "
            f"({count * dtype.itemsize} expected)"
        )
    return reshape(name, np.frombuffer(raw, dtype=dtype), dims)


def from_json(
    name: str, datatype: str, shape: Sequence[int], data: Any, max_bytes_elements: int | None = None
) -> np.ndarray:
    """A tensor from the JSON form's `data` (flat or nested; `BYTES` elements as base64 strings)."""
    dims = check_shape(name, shape, datatype, max_bytes_elements)
    count = math.prod(dims)
    flat = data if isinstance(data, list) and not (data and isinstance(data[0], list)) else list(_flatten(data))
    if len(flat) != count:
        raise TensorError(f"input {name!r}: {len(flat)} elements for shape {list(dims)} ({count} expected)")
    if datatype == BYTES:
        array = np.empty(count, dtype=np.object_)
        for i, element in enumerate(flat):
            if not isinstance(element, str):
                raise TensorError(f"input {name!r}: BYTES elements in JSON must be base64 strings")
            try:
                array[i] = base64.b64decode(element, validate=True)
            except (binascii.Error, ValueError):
                raise TensorError(f"input {name!r}: element {i} is not valid base64") from None
        return reshape(name, array, dims)
    dtype = _dtype(name, datatype)
    try:
        values = np.asarray(flat)
        if values.dtype.kind not in "biuf" or values.ndim != 1:  # strings, nested lists, objects, null
            raise ValueError("elements must be numbers")
        if dtype.kind in "iu" and values.size:  # a cast would wrap 256 to 0 and cut 0.5 to 0: refuse instead
            limits = np.iinfo(dtype)
            if not np.array_equal(values, np.round(values)):
                raise ValueError("elements must be whole numbers")
            if values.min() < limits.min or values.max() > limits.max:
                raise ValueError(f"elements must lie in {limits.min}..{limits.max}")
        return reshape(name, values.astype(dtype), dims)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TensorError(f"input {name!r}: the data are not {datatype} ({exc})") from None


def to_raw(array: np.ndarray) -> bytes:
    """A tensor's raw bytes (the inverse of `from_raw`)."""
    if array.dtype == np.object_:
        return b"".join(_LENGTH.pack(len(e)) + bytes(e) for e in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=DTYPES[datatype_of(array)]).tobytes()


def to_json(array: np.ndarray) -> list[Any]:
    """A tensor's JSON `data`: its elements flattened (`BYTES` as base64 strings)."""
    if array.dtype == np.object_:
        return [base64.b64encode(bytes(e)).decode("ascii") for e in array.reshape(-1)]
    flat: list[Any] = array.reshape(-1).tolist()
    return flat


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    try:
        return DTYPES[datatype]
    except KeyError:
        raise TensorError(f"input {name!r}: unknown datatype {datatype!r}") from None


def _bytes_elements(name: str, raw: bytes, count: int) -> np.ndarray:
    if count * _LENGTH.size > len(raw):  # checked before allocating: the shape alone could ask for anything
        raise TensorError(f"input {name!r}: {len(raw)} bytes cannot hold {count} BYTES elements")
    elements = np.empty(count, dtype=np.object_)
    view, offset = memoryview(raw), 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise TensorError(f"input {name!r}: the BYTES data end before element {i + 1} of {count}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(f"input {name!r}: BYTES element {i + 1} is cut short")
        elements[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise TensorError(f"input {name!r}: {len(raw) - offset} bytes left over after {count} BYTES elements")
    return elements


def _flatten(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data
