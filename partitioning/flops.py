"""Static per-node work of an ONNX graph at batch 1: FLOPs, bytes moved, weight bytes, op class.

The formulas (`op_flops`) take only shapes, so they also serve the onnxruntime profiler's shape records
(`partitioning.costs` fits a measured device's throughput from them on a device without onnx). `node_stats`
needs onnx (shape inference) and imports it when called.

FLOPs table (a multiply-add counts 2; "out" = output elements, "in" = elements of the first input):

    Conv            2 * out * (Cin/group * kh * kw)  [= 2 * out * prod(W.shape[1:])]   + out if bias
    ConvTranspose   2 * in * (Cout/group * kh * kw)  [= 2 * in * prod(W.shape[1:])]    + out if bias
    MatMul          2 * out * K        (K = last dim of A; batch dims broadcast into `out`)
    Gemm            2 * M * N * K      (+ M*N when C is given)
    Add, Mul, Relu, Clip, ... (ELEMENTWISE_1)        1 per out
    BatchNormalization                               2 per out (scale and shift)
    Sigmoid, Tanh, Erf, Gelu, HardSwish, ... (TRANSCENDENTAL)     4 per out
    Softmax, LogSoftmax                              5 per out (max, sub, exp, sum, div)
    LayerNormalization, InstanceNormalization, GroupNormalization  5 per out
    MaxPool, AveragePool, LpPool                     out * prod(kernel_shape) (shapes only: ~in)
    GlobalAveragePool, GlobalMaxPool, Reduce*        1 per in
    Resize, Upsample                                 2 per out
    Reshape, Transpose, Concat, Slice, Gather, Cast, ... (DATA_MOVEMENT)   0 (memory-bound only)
    anything else                                    1 per out (elementwise estimate; never an error)

Quantized and fused forms (QLinearConv, ConvInteger, FusedConv, QLinearMatMul, MatMulInteger, FusedMatMul,
QGemm, QLinearAdd, ...) use the formula of their base op: see `base_op`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from models.dtypes import itemsize

if TYPE_CHECKING:  # onnx is imported only where a ModelProto is analysed
    import onnx

Shape = Sequence[int] | None

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ELEMENTWISE_1 = frozenset(
    {"Add", "Sub", "Mul", "Div", "Relu", "Max", "Min", "Sum", "Mean", "Neg", "Abs", "Clip", "Sqrt", "Pow",
     "Reciprocal", "Floor", "Ceil", "Round", "Sign", "PRelu", "LeakyRelu", "ThresholdedRelu", "Equal", "Less",
     "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Where", "Mod", "BitShift",
     "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Dropout"}
)
TRANSCENDENTAL = frozenset(
    {"Sigmoid", "Tanh", "Erf", "Exp", "Log", "Gelu", "BiasGelu", "FastGelu", "HardSigmoid", "HardSwish", "Elu",
     "Selu", "Celu", "Softplus", "Softsign", "Mish", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh"}
)
NORMS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization",
                   "SimplifiedLayerNormalization", "SkipLayerNormalization", "LpNormalization",
                   "MeanVarianceNormalization"})
WINDOW_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
REDUCTIONS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean", "ReduceSum",
                        "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                        "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "TopK"})
DATA_MOVEMENT = frozenset(
    {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size", "Constant", "ConstantOfShape",
     "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Scatter",
     "ScatterElements", "ScatterND", "Pad", "Cast", "CastLike", "Expand", "Tile", "DepthToSpace",
     "SpaceToDepth", "Range", "NonZero", "OneHot", "EyeLike", "ReorderInput", "ReorderOutput"}
)
# Ops that alias their input in onnxruntime (no copy); the estimator charges them launch overhead only.
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size", "Constant",
                      "Dropout"})


def base_op(op_type: str) -> str:
    """The standard op whose formula a quantized or fused variant uses (QLinearConv -> Conv)."""
    for prefix in ("QLinear", "Fused", "DynamicQuantize"):
        if op_type.startswith(prefix) and len(op_type) > len(prefix):
            return op_type[len(prefix):]
    aliases = {"ConvInteger": "Conv", "MatMulInteger": "MatMul", "QGemm": "Gemm", "QAttention": "MatMul",
               "Attention": "MatMul", "MatMulNBits": "MatMul", "NhwcConv": "Conv", "QLinearConvTranspose":
               "ConvTranspose", "Einsum": "MatMul"}
    return aliases.get(op_type, op_type)


def op_class(op_type: str) -> str:
    """'compute' for Conv/Gemm/MatMul/ConvTranspose (and their quantized or fused forms), else 'memory'."""
    return "compute" if base_op(op_type) in COMPUTE_OPS else "memory"


def shape_known(shape: Shape) -> bool:
    """Whether every dimension of `shape` is known."""
    return shape is not None and all(d is not None and d >= 0 for d in shape)


def numel(shape: Shape) -> int:
    """Element count of a shape; 0 when the shape or any dimension is unknown."""
    if shape is None or any(d is None or d < 0 for d in shape):
        return 0
    return math.prod(shape)


def op_flops(
    op_type: str,
    in_shapes: Sequence[Shape],
    out_shapes: Sequence[Shape],
    attrs: Mapping[str, object] | None = None,
) -> float:
    """FLOPs of one op from its input and output shapes (see the module table); unknown shapes count 0."""
    op = base_op(op_type)
    out = numel(out_shapes[0]) if out_shapes else 0
    first_in = numel(in_shapes[0]) if in_shapes else 0
    w_index, bias_index = (3, 8) if op_type.startswith("QLinear") else (1, 2)  # QLinearConv: x, scale, zp, w, ...
    weight = in_shapes[w_index] if len(in_shapes) > w_index else None
    bias = out if len(in_shapes) > bias_index and op_type != "ConvInteger" else 0
    if op == "Conv":
        per_out = numel(tuple(weight)[1:]) if weight else 0
        return 2.0 * out * per_out + bias
    if op == "ConvTranspose":
        per_in = numel(tuple(weight)[1:]) if weight else 0
        return 2.0 * first_in * per_in + bias
    if op == "MatMul":
        a = in_shapes[0] if in_shapes else None
        k = a[-1] if a else 0
        return 2.0 * out * (k if k and k > 0 else 0)
    if op == "Gemm":
        rows = out_shapes[0][0] if out_shapes and out_shapes[0] else 0
        k = first_in // rows if rows and rows > 0 else 0
        return 2.0 * out * k + (out if len(in_shapes) > 2 else 0)
    if op in DATA_MOVEMENT:
        return 0.0
    if op in ELEMENTWISE_1:
        return float(out)
    if op == "BatchNormalization":
        return 2.0 * out
    if op in TRANSCENDENTAL:
        return 4.0 * out
    if op in ("Softmax", "LogSoftmax") or op in NORMS:
        return 5.0 * out
    if op in WINDOW_POOLS:
        kernel = (attrs or {}).get("kernel_shape")
        if kernel:
            return float(out) * math.prod(int(k) for k in cast(Sequence[int], kernel))
        return float(max(first_in, out))
    if op in REDUCTIONS:
        return float(first_in)
    if op in ("Resize", "Upsample"):
        return 2.0 * out
    return float(out)


@dataclass(frozen=True)
class NodeStats:
    """Static work of one node at batch 1."""

    name: str
    op_type: str
    flops: float
    bytes_in: int
    bytes_out: int
    weight_bytes: int
    op_class: str
    shapes_known: bool = True  # False: an input or output shape could not be inferred, so the work above is a guess

    @property
    def bytes_total(self) -> int:
        """Bytes read plus bytes written."""
        return self.bytes_in + self.bytes_out


def _with_batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose dynamic (or non-positive) leading input dimension is fixed to 1."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    init_names = {t.name for t in fixed.graph.initializer}
    for value in fixed.graph.input:
        if value.name in init_names or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) and (dims[0].HasField("dim_param") or dims[0].dim_value <= 0):
            dims[0].Clear()
            dims[0].dim_value = 1
    return fixed


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference with data propagation; the un-inferred model when inference fails."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - an op onnx cannot infer must not stop the analysis: shapes stay unknown
        return model


def node_stats(model: onnx.ModelProto) -> dict[str, NodeStats]:
    """Per-node FLOPs, bytes and op class of `model` at batch 1, keyed by node name in graph order."""
    from onnx import helper

    inferred = _infer(_with_batch_one(model))
    graph = inferred.graph
    types: dict[str, tuple[int, Shape]] = {}

    def record(value: onnx.ValueInfoProto) -> None:
        if not value.type.HasField("tensor_type"):
            return
        tensor_type = value.type.tensor_type
        shape: Shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        types[value.name] = (tensor_type.elem_type, shape)

    for value in (*graph.input, *graph.value_info, *graph.output):
        record(value)
    constants: set[str] = set()
    for tensor in graph.initializer:
        types[tensor.name] = (tensor.data_type, tuple(tensor.dims))
        constants.add(tensor.name)
    _measure_unknown(inferred, types)
    for node in graph.node:  # constant-folded chains (Identity/Transpose of a weight) still count as weights
        if node.op_type == "Constant" or (node.input and all(not i or i in constants for i in node.input)):
            constants.update(o for o in node.output if o)

    def nbytes(name: str) -> int:
        elem, shape = types.get(name, (1, None))
        return numel(shape) * itemsize(elem)

    stats: dict[str, NodeStats] = {}
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        ins = [i for i in node.input if i]
        outs = [o for o in node.output if o]
        in_shapes = [types.get(i, (1, None))[1] for i in ins]
        out_shapes = [types.get(o, (1, None))[1] for o in outs]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name == "kernel_shape"}
        stats[name] = NodeStats(
            name=name,
            op_type=node.op_type,
            flops=op_flops(node.op_type, in_shapes, out_shapes, attrs),
            bytes_in=sum(nbytes(i) for i in ins),
            bytes_out=sum(nbytes(o) for o in outs),
            weight_bytes=sum(nbytes(i) for i in ins if i in constants),
            op_class=op_class(node.op_type),
            shapes_known=all(map(shape_known, (*in_shapes, *out_shapes))),
        )
    return stats


def _measure_unknown(model: onnx.ModelProto, types: dict[str, tuple[int, Shape]]) -> None:
    """Fill in, from one onnxruntime run at batch 1, the shapes static inference left unknown (a Reshape to a
    computed shape, attention's shape arithmetic): no node is costed at zero for want of a shape."""
    from models.dtypes import onnx_type

    names = [t for node in model.graph.node for t in (*node.input, *node.output)
             if t and not shape_known(types.get(t, (0, None))[1])]
    if not names:
        return
    from partitioning.graph import shapes_at_batch_one

    try:
        measured = shapes_at_batch_one(model, list(dict.fromkeys(names)))
    except Exception:  # noqa: BLE001 - a model onnxruntime cannot run keeps its unknown shapes (reported as such)
        return
    for name in names:
        if name in measured:
            shape, dtype = measured[name]
            types[name] = (onnx_type(dtype), shape)


# Ops that onnxruntime and TensorRT fold into the Conv/Gemm/MatMul producing their input.
FUSABLE_EPILOGUE = frozenset({"Relu", "Clip", "LeakyRelu", "BatchNormalization", "Sigmoid", "HardSigmoid",
                              "HardSwish", "Tanh"})


def runtime_free_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes an optimizing runtime removes, with why: constant-folded, or fused into their producer."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph.node)]
    consumers: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    producer: dict[str, tuple[str, str]] = {}  # tensor -> (node name, node op or "fused")
    free: dict[str, str] = {}
    for name, node in zip(names, graph.node):
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in constants for i in ins)):
            constants.update(o for o in node.output if o)
            free[name] = "constant-folded"
            continue
        data_in = [i for i in ins if i not in constants]
        if node.op_type in FUSABLE_EPILOGUE and len(data_in) == 1 and data_in[0] in producer:
            src, src_kind = producer[data_in[0]]
            single_use = consumers.get(data_in[0], 0) == 1 and data_in[0] not in graph_outputs
            if single_use and (src_kind in COMPUTE_OPS or src_kind == "fused"):
                free[name] = f"fused into {src}"
                producer.update({o: (src, "fused") for o in node.output if o})
                continue
        producer.update({o: (name, base_op(node.op_type)) for o in node.output if o})
    return free
