"""The messages between the HTTP front-end processes and the model host (`FOCAL_WORKERS` > 1).

One Unix stream socket per front-end process. A message is a 12-byte prefix (header length,
payload length; big-endian), a JSON header and an optional binary payload: the raw bytes of one
C-ordered array whose dtype and shape the header gives. The only large payloads are the
preprocessed samples going to the host and the output rows coming back, so they are written as
they are, never encoded; everything else is small JSON.

Requests carry an `id`; the host answers each `infer` and `status` with the same `id`, in any
order (many requests are in flight at once). No web framework and no model here.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import numpy as np

PREFIX = struct.Struct(">IQ")
MAX_HEADER_BYTES = 1 << 20  # headers are small JSON; a larger one means a broken peer


class ProtocolError(Exception):
    """The peer sent something that is not a message."""


async def read_message(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The next message: (header, payload). `asyncio.IncompleteReadError` when the peer closed."""
    header_len, payload_len = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"a header of {header_len} bytes")
    header = json.loads(await reader.readexactly(header_len))
    if not isinstance(header, dict):
        raise ProtocolError("a header that is not a JSON object")
    payload = await reader.readexactly(payload_len) if payload_len else b""
    return header, payload


def write_message(writer: asyncio.StreamWriter, header: dict[str, Any], array: np.ndarray | None = None) -> None:
    """Queue one message (`array`, if given, as the payload; its dtype and shape go in the header).
    The caller awaits `writer.drain()` when it must not outrun the peer."""
    payload: bytes | memoryview = b""
    if array is not None:
        array = np.ascontiguousarray(array)
        header = {**header, "dtype": array.dtype.str, "shape": list(array.shape)}
        payload = array.data.cast("B")
    data = json.dumps(header, separators=(",", ":")).encode()
    writer.write(PREFIX.pack(len(data), len(payload)) + data)
    if payload:
        writer.write(payload)


def array_of(header: dict[str, Any], payload: bytes) -> np.ndarray:
    """The array a message carries (read-only, over the payload's bytes)."""
    dtype, shape = np.dtype(header["dtype"]), tuple(int(n) for n in header["shape"])
    if dtype.hasobject or dtype.itemsize * int(np.prod(shape)) != len(payload):
        raise ProtocolError(f"a payload of {len(payload)} bytes for {dtype.str} {list(shape)}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)
