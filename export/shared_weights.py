"""Graphs that share their weights through one ONNX external-data file.

A detector's canvases are separate graphs (the window gathers are static per size) around the
same weights. Saved plainly, each file would hold its own copy. `share_weights` moves every
initializer of at least `MIN_BYTES` into one external-data file, each distinct tensor once
(identical bytes, type and shape are stored once, whichever graph and name they came from), and
points each graph's initializers at their place in it. onnxruntime, TensorRT's `parse_from_file`
and `onnx.load` read such graphs from their folder. Only the small tensors stay inside each graph;
what really differs per canvas (anchors, gathers, attention masks folded into biases) is in the
shared file too, once per distinct tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx

MIN_BYTES = 1024
ALIGNMENT = 4096  # offsets on page boundaries, so a runtime may map the file rather than read it


@dataclass(frozen=True)
class SharingReport:
    total_bytes: int  # what the moved tensors would take with each graph holding its own
    shared_bytes: int  # the external-data file's size


def share_weights(folder: Path, names: list[str], data_name: str) -> SharingReport:
    """Rewrite the graphs `names` (files in `folder`) to keep their large initializers in `folder/data_name`."""
    if len(set(names)) != len(names):
        raise ValueError(f"graphs named twice: {sorted(names)}")
    offsets: dict[bytes, tuple[int, int]] = {}
    total = 0
    data_path = folder / data_name
    with data_path.open("wb") as data:
        for name in names:
            proto = onnx.load(str(folder / name), load_external_data=False)
            if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _initializers(proto.graph)):
                raise ValueError(f"{name} already keeps weights in an external file")
            for tensor in _initializers(proto.graph):
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < MIN_BYTES:
                    continue
                raw = tensor.raw_data
                total += len(raw)
                key = hashlib.sha256(f"{tensor.data_type}:{list(tensor.dims)}:".encode() + raw).digest()
                if key not in offsets:
                    start = -(-data.tell() // ALIGNMENT) * ALIGNMENT
                    data.seek(start)
                    data.write(raw)
                    offsets[key] = (start, len(raw))
                offset, length = offsets[key]
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
            (folder / name).write_bytes(proto.SerializeToString())
    return SharingReport(total, data_path.stat().st_size)


def _initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The graph's initializers, and those of its subgraphs (If/Loop bodies)."""
    found = list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
                found += _initializers(sub)
    return found
