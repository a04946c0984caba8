"""Hand-built .tflite heads for the tiny bundle (models/tiny_bundle.py), written with LiteRT's flatbuffer schema.

The tiny bundle's head is Conv(3->8, 3x3, pad 1) + Relu from `input` [N,3,16,16] to `relu1` [N,8,16,16]. Its
.tflite twin is what the converter makes of such a head: TRANSPOSE (NCHW -> NHWC), CONV_2D with a fused RELU,
TRANSPOSE back, the ends named as in ONNX; the int8 one is full-integer (int8 input and output with a scale and zero
point from the calibration samples, per-channel int8 weights, int32 bias). Tests use it where the onnx2tf converter
environment (Python 3.12+, a download) is not at hand: `make_converter()` is a Converter for add_tflite_heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from models.tiny_bundle import CUT_TENSOR, INPUT
from partitioning.tflite import TFLiteConversionError

CONV_2D, TRANSPOSE = 3, 39
RELU = 1  # ActivationFunctionType.RELU


def _affine(lo: float, hi: float) -> tuple[float, int]:
    """int8 scale and zero point covering [lo, hi] (and 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    return scale, int(np.clip(round(-128 - lo / scale), -128, 127))


def write_conv_relu_tflite(path: Path, w: np.ndarray, b: np.ndarray, hw: int,
                           int8: tuple[tuple[float, int], tuple[float, int]] | None = None) -> Path:
    """A TRANSPOSE, CONV_2D(+RELU), TRANSPOSE model equal to ONNX Conv(pad 1)+Relu; int8 = ((s_in, zp), (s_out, zp))."""
    from ai_edge_litert import schema_py_generated as fb
    from flatbuffers import Builder

    cout, cin = w.shape[:2]
    model = fb.ModelT()
    model.version, model.description = 3, b"splitinfer test head"
    model.buffers = [fb.BufferT()]
    graph = fb.SubGraphT()
    graph.tensors, graph.operators = [], []

    def quant(scales: Sequence[float], zeros: Sequence[int], axis: int = 0) -> Any:
        q = fb.QuantizationParametersT()
        q.scale, q.zeroPoint, q.quantizedDimension = [float(s) for s in scales], [int(z) for z in zeros], axis
        return q

    def tensor(name: str, shape: Sequence[int], ttype: int, data: np.ndarray | None = None, q: Any = None) -> int:
        t = fb.TensorT()
        t.name, t.shape, t.type, t.quantization = name.encode(), list(shape), ttype, q
        if data is not None:
            buf = fb.BufferT()
            buf.data = np.ascontiguousarray(data).tobytes()
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    act = fb.TensorType.INT8 if int8 else fb.TensorType.FLOAT32
    q_in = quant([int8[0][0]], [int8[0][1]]) if int8 else None
    q_out = quant([int8[1][0]], [int8[1][1]]) if int8 else None
    x = tensor(INPUT, (1, cin, hw, hw), act, q=q_in)
    x_nhwc = tensor("input_nhwc", (1, hw, hw, cin), act, q=q_in)
    y_nhwc = tensor("relu1_nhwc", (1, hw, hw, cout), act, q=q_out)
    y = tensor(CUT_TENSOR, (1, cout, hw, hw), act, q=q_out)
    filt = w.transpose(0, 2, 3, 1)  # OIHW -> OHWI
    if int8:
        w_scale = np.maximum(np.abs(filt).reshape(cout, -1).max(1), 1e-8) / 127.0
        qw = np.clip(np.round(filt / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        b_scale = int8[0][0] * w_scale
        f = tensor("conv1.w", filt.shape, fb.TensorType.INT8, qw, quant(w_scale, [0] * cout))
        bias = tensor("conv1.b", (cout,), fb.TensorType.INT32, np.round(b / b_scale).astype(np.int32),
                      quant(b_scale, [0] * cout))
    else:
        f = tensor("conv1.w", filt.shape, fb.TensorType.FLOAT32, filt.astype(np.float32))
        bias = tensor("conv1.b", (cout,), fb.TensorType.FLOAT32, b.astype(np.float32))
    to_nhwc = tensor("perm_nhwc", (4,), fb.TensorType.INT32, np.array([0, 2, 3, 1], np.int32))
    to_nchw = tensor("perm_nchw", (4,), fb.TensorType.INT32, np.array([0, 3, 1, 2], np.int32))

    codes = []
    for op_code in (TRANSPOSE, CONV_2D):
        c = fb.OperatorCodeT()
        c.builtinCode = c.deprecatedBuiltinCode = op_code
        c.version = 3 if int8 and op_code == CONV_2D else (2 if int8 else 1)
        codes.append(c)
    model.operatorCodes = codes

    def op(code: int, ins: list[int], outs: list[int], kind: int, options: Any) -> None:
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = code, ins, outs
        o.builtinOptionsType, o.builtinOptions = kind, options
        graph.operators.append(o)

    conv = fb.Conv2DOptionsT()
    conv.padding, conv.strideW, conv.strideH, conv.fusedActivationFunction = fb.Padding.SAME, 1, 1, RELU
    op(0, [x, to_nhwc], [x_nhwc], fb.BuiltinOptions.TransposeOptions, fb.TransposeOptionsT())
    op(1, [x_nhwc, f, bias], [y_nhwc], fb.BuiltinOptions.Conv2DOptions, conv)
    op(0, [y_nhwc, to_nchw], [y], fb.BuiltinOptions.TransposeOptions, fb.TransposeOptionsT())
    graph.inputs, graph.outputs, graph.name = [x], [y], b"main"
    model.subgraphs = [graph]
    builder = Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    Path(path).write_bytes(bytes(builder.Output()))
    return Path(path)


def make_converter() -> Any:
    """A Converter (partitioning.tflite) that builds the tiny bundle's conv head by hand; other heads fail."""

    def one(head: Path, fp32: Path, int8: Path, calib: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
        model = onnx.load(str(head))
        if [n.op_type for n in model.graph.node] != ["Conv", "Relu"]:
            raise TFLiteConversionError(f"{head}: the test converter only builds Conv+Relu heads")
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        w, b = weights["conv1.w"], weights["conv1.b"]
        x = np.concatenate([s[INPUT] for s in calib]).astype(np.float32)
        hw = x.shape[-1]
        write_conv_relu_tflite(fp32, w, b, hw)
        from partitioning.extract import session

        y = np.concatenate([session(head).run(None, {INPUT: s[INPUT]})[0] for s in calib])
        write_conv_relu_tflite(int8, w, b, hw, (_affine(float(x.min()), float(x.max())), _affine(0.0, float(y.max()))))
        return {"mapping": {"inputs": [{"onnx": INPUT, "perm": [0, 2, 3, 1]}],
                            "outputs": [{"onnx": CUT_TENSOR, "index": 0, "perm": [0, 2, 3, 1]}]}}

    def convert(heads: Sequence[tuple[Path, Path, Path]], calib: Sequence[dict[str, np.ndarray]]) -> list[Any]:
        out: list[Any] = []
        for head, fp32, int8 in heads:
            try:
                out.append(one(head, fp32, int8, calib))
            except TFLiteConversionError as exc:
                out.append(exc)
        return out

    return convert
