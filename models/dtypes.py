"""ONNX element types and numpy dtypes: the one table (the numbers are TensorProto.DataType of onnx.proto).

Importing this needs only numpy, so the edge (no onnx) and the wire codec can use it. Names are onnxruntime's,
as in `tensor(float)` of `InferenceSession.get_inputs()[i].type` and in its profiler's shape records.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# TensorProto.DataType -> (onnxruntime name, numpy dtype name or None where numpy has none, bytes per element;
# sub-byte types rounded up to 1)
ONNX_TYPES: dict[int, tuple[str, str | None, int]] = {
    1: ("float", "float32", 4),
    2: ("uint8", "uint8", 1),
    3: ("int8", "int8", 1),
    4: ("uint16", "uint16", 2),
    5: ("int16", "int16", 2),
    6: ("int32", "int32", 4),
    7: ("int64", "int64", 8),
    8: ("string", None, 8),
    9: ("bool", "bool", 1),
    10: ("float16", "float16", 2),
    11: ("double", "float64", 8),
    12: ("uint32", "uint32", 4),
    13: ("uint64", "uint64", 8),
    14: ("complex64", "complex64", 8),
    15: ("complex128", "complex128", 16),
    16: ("bfloat16", None, 2),
    17: ("float8e4m3fn", None, 1),
    18: ("float8e4m3fnuz", None, 1),
    19: ("float8e5m2", None, 1),
    20: ("float8e5m2fnuz", None, 1),
    21: ("uint4", None, 1),
    22: ("int4", None, 1),
    23: ("float4e2m1", None, 1),
}
FLOAT = 1
ITEMSIZE: dict[int, int] = {code: size for code, (_, _, size) in ONNX_TYPES.items() if code != 8}
BY_ORT_NAME: dict[str, int] = {name: code for code, (name, _, _) in ONNX_TYPES.items()}
BY_NUMPY_NAME: dict[str, int] = {np_name: code for code, (_, np_name, _) in ONNX_TYPES.items() if np_name}
# The dtypes model inputs may have (floats, integers, bool): what synthetic inputs can be made for.
NUMERIC_ORT_NAMES = ("float", "float16", "double", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                     "uint64", "bool")


def numpy_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type; ValueError where numpy has none (bfloat16, float8, int4)."""
    entry = ONNX_TYPES.get(int(elem_type))
    if entry is None or entry[1] is None:
        raise ValueError(f"ONNX element type {elem_type} has no numpy dtype")
    return np.dtype(entry[1])


def onnx_type(dtype: Any) -> int:
    """The ONNX element type (TensorProto.DataType) of a numpy dtype or dtype name."""
    name = np.dtype(dtype).name
    if name not in BY_NUMPY_NAME:
        raise ValueError(f"numpy dtype {name} has no ONNX element type")
    return BY_NUMPY_NAME[name]


def ort_type_name(ort_type: str) -> str:
    """`float` from onnxruntime's `tensor(float)` (a bare name is returned as is)."""
    return ort_type[len("tensor("):-1] if ort_type.startswith("tensor(") and ort_type.endswith(")") else ort_type


def itemsize(elem_type: int, default: int = 4) -> int:
    """Bytes per element of an ONNX element type (`default` for an unknown one)."""
    return ITEMSIZE.get(int(elem_type), default)


def ort_numpy_dtype(ort_type: str) -> np.dtype:
    """The numpy dtype of an onnxruntime type (`tensor(float)` or `float`); ValueError where there is none."""
    name = ort_type_name(ort_type)
    if name not in BY_ORT_NAME:
        raise ValueError(f"unknown onnxruntime type {ort_type!r}")
    return numpy_dtype(BY_ORT_NAME[name])
