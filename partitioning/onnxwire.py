"""The few ONNX messages `partitioning.costs` needs, parsed and written by protobuf without onnx.

The [edge] extra has protobuf but not onnx (whose package holds onnx.proto's generated module); a user measures
on the real Raspberry Pi or Jetson with only onnxruntime and numpy. So the messages are declared here with the
field numbers of onnx.proto, only the fields used: protobuf skips (and keeps) every other field when it parses
a model, and writes the one-op probe models from the same declarations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

_FD = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "splitinfer.onnxwire"
# message -> (field name, number, type, repeated, message type): a subset of onnx.proto (proto2)
_MESSAGES: dict[str, tuple[tuple[str, int, int, bool, str], ...]] = {
    "ModelProto": (("ir_version", 1, _FD.TYPE_INT64, False, ""), ("graph", 7, _FD.TYPE_MESSAGE, False, "GraphProto"),
                   ("opset_import", 8, _FD.TYPE_MESSAGE, True, "OperatorSetIdProto")),
    "OperatorSetIdProto": (("domain", 1, _FD.TYPE_STRING, False, ""), ("version", 2, _FD.TYPE_INT64, False, "")),
    "GraphProto": (("node", 1, _FD.TYPE_MESSAGE, True, "NodeProto"), ("name", 2, _FD.TYPE_STRING, False, ""),
                   ("initializer", 5, _FD.TYPE_MESSAGE, True, "TensorProto"),
                   ("input", 11, _FD.TYPE_MESSAGE, True, "ValueInfoProto"),
                   ("output", 12, _FD.TYPE_MESSAGE, True, "ValueInfoProto")),
    "NodeProto": (("input", 1, _FD.TYPE_STRING, True, ""), ("output", 2, _FD.TYPE_STRING, True, ""),
                  ("name", 3, _FD.TYPE_STRING, False, ""), ("op_type", 4, _FD.TYPE_STRING, False, "")),
    "TensorProto": (("name", 8, _FD.TYPE_STRING, False, ""),),
    "ValueInfoProto": (("name", 1, _FD.TYPE_STRING, False, ""), ("type", 2, _FD.TYPE_MESSAGE, False, "TypeProto")),
    "TypeProto": (("tensor_type", 1, _FD.TYPE_MESSAGE, False, "TensorTypeProto"),),
    "TensorTypeProto": (("elem_type", 1, _FD.TYPE_INT32, False, ""),
                        ("shape", 2, _FD.TYPE_MESSAGE, False, "TensorShapeProto")),
    "TensorShapeProto": (("dim", 1, _FD.TYPE_MESSAGE, True, "DimensionProto"),),
    "DimensionProto": (("dim_value", 1, _FD.TYPE_INT64, False, ""),),
}


def _classes() -> dict[str, Any]:
    """The message classes of the declarations above, in a pool of their own."""
    file = descriptor_pb2.FileDescriptorProto(name="splitinfer/onnxwire.proto", package=_PACKAGE, syntax="proto2")
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind, repeated, type_name in fields:
            message.field.add(name=field_name, number=number, type=kind,
                              label=_FD.LABEL_REPEATED if repeated else _FD.LABEL_OPTIONAL,
                              type_name=f".{_PACKAGE}.{type_name}" if type_name else None)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
            for name in _MESSAGES}


_PROTO = _classes()
FLOAT = 1  # TensorProto.FLOAT


@dataclass(frozen=True)
class OnnxNode:
    """One NodeProto: name, op type, input and output tensor names."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def read_graph(path: Path) -> tuple[list[OnnxNode], set[str]]:
    """Top-level nodes (names filled in as `<op>_<index>` when empty) and initializer names of an ONNX file."""
    model = _PROTO["ModelProto"]()
    try:
        model.ParseFromString(Path(path).read_bytes())
        if not model.HasField("graph"):
            raise ValueError("no graph in the file")
    except (DecodeError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable ONNX model ({exc})") from exc
    nodes: list[OnnxNode] = []
    for node in model.graph.node:
        name = node.name or f"{node.op_type}_{len(nodes)}"
        nodes.append(OnnxNode(name, node.op_type, tuple(node.input), tuple(node.output)))
    return nodes, {t.name for t in model.graph.initializer}


def one_op_model(op_type: str, dims: Sequence[int]) -> bytes:
    """An ONNX model of one float op (Identity, Relu, ...) from x to y of shape `dims`, written without onnx."""
    model = _PROTO["ModelProto"](ir_version=8)
    model.opset_import.add(domain="", version=17)
    graph = model.graph
    graph.node.add(input=["x"], output=["y"], name="op", op_type=op_type)
    graph.name = op_type.lower()
    for value, name in ((graph.input.add(), "x"), (graph.output.add(), "y")):
        value.name = name
        tensor = value.type.tensor_type
        tensor.elem_type = FLOAT
        for d in dims:
            tensor.shape.dim.add(dim_value=int(d))
    return model.SerializeToString()


def identity_model() -> bytes:
    """One Identity on a float[1]: what one session.run costs besides its nodes."""
    return one_op_model("Identity", [1])
