"""Reading and writing the few ONNX fields `partitioning.costs` needs, on the protobuf wire format, without onnx.

The [edge] extra has protobuf but not onnx, and onnx.proto's generated module comes with onnx; a user measures
on the real Raspberry Pi or Jetson with only onnxruntime and numpy. So the graph's nodes and initializer names
are read straight off the wire (field numbers from onnx.proto), and the one-op probe models are written the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


@dataclass(frozen=True)
class OnnxNode:
    """One NodeProto: name, op type, input and output tensor names."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterable[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in buf[start:end]; others are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
    if pos != end:
        raise ValueError("truncated protobuf message")


def read_graph(path: Path) -> tuple[list[OnnxNode], set[str]]:
    """Top-level nodes (names filled in as `<op>_<index>` when empty) and initializer names of an ONNX file."""
    buf = path.read_bytes()
    try:
        graph = next(((s, e) for n, s, e in _fields(buf, 0, len(buf)) if n == 7), None)  # ModelProto.graph
        if graph is None:
            raise ValueError("no graph in the file")
        nodes: list[OnnxNode] = []
        initializers: set[str] = set()
        for number, start, end in _fields(buf, *graph):
            if number == 1:  # GraphProto.node -> NodeProto: input 1, output 2, name 3, op_type 4
                parts: dict[int, list[str]] = {1: [], 2: [], 3: [], 4: []}
                for n, s, e in _fields(buf, start, end):
                    if n in parts:
                        parts[n].append(buf[s:e].decode("utf-8"))
                op = parts[4][0] if parts[4] else ""
                name = parts[3][0] if parts[3] and parts[3][0] else f"{op}_{len(nodes)}"
                nodes.append(OnnxNode(name, op, tuple(parts[1]), tuple(parts[2])))
            elif number == 5:  # GraphProto.initializer -> TensorProto.name is field 8
                initializers.update(buf[s:e].decode("utf-8") for n, s, e in _fields(buf, start, end) if n == 8)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable ONNX model ({exc})") from exc
    return nodes, initializers


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(*fields: tuple[int, int | bytes | str]) -> bytes:
    """A protobuf message from (field number, int | bytes | str) pairs: varints and length-delimited fields."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            out += _encode_varint(number << 3) + _encode_varint(value)
        else:
            data = value.encode("utf-8") if isinstance(value, str) else value
            out += _encode_varint(number << 3 | 2) + _encode_varint(len(data)) + data
    return bytes(out)


def one_op_model(op_type: str, dims: Sequence[int]) -> bytes:
    """An ONNX model of one float op (Identity, Relu, ...) from x to y of shape `dims`, written without onnx."""
    shape = _message(*((1, _message((1, int(d)))) for d in dims))  # TensorShapeProto { dim { dim_value } ... }
    tensor_type = _message((1, _message((1, 1), (2, shape))))  # TypeProto { tensor_type { elem_type: FLOAT, shape } }
    node = _message((1, "x"), (2, "y"), (3, "op"), (4, op_type))  # NodeProto input, output, name, op_type
    graph = _message((1, node), (2, op_type.lower()), (11, _message((1, "x"), (2, tensor_type))),
                     (12, _message((1, "y"), (2, tensor_type))))  # GraphProto node, name, input, output
    return _message((1, 8), (7, graph), (8, _message((1, ""), (2, 17))))  # ir_version 8, graph, opset 17


def identity_model() -> bytes:
    """One Identity on a float[1]: what one session.run costs besides its nodes."""
    return one_op_model("Identity", [1])
