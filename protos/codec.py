"""The one place numpy arrays become proto `Tensor`s and back: codecs, compression and validation.

Codec specs: `fp32`, `fp16`, `int8` (affine, one scale per tensor), `int8c` (affine, one scale per channel
along axis 1), each optionally followed by `+lz4` or `+zstd` (e.g. `int8+zstd`). Only floating arrays are
converted; integer arrays (token ids, masks) always travel losslessly in their own dtype.

Wire rules (what `decode` accepts):
- `raw_size` is the byte length of `data` once decompressed and must equal prod(shape) * itemsize(dtype).
- `LZ4` is the lz4 *block* format without a stored size (`raw_size` is the size); `ZSTD` is one or more
  zstd frames. Decompression never produces more than `raw_size` bytes: a zip bomb is refused, not inflated.
- A quantized tensor has `dtype` INT8 (or UINT8), `quantization` set and `logical_dtype` FLOAT32:
  real = scale * (q - zero_point); `axis` -1 with one scale, or `axis` k with shape[k] scales.
- `logical_dtype` is the dtype handed to the model: FLOAT32 for FLOAT16 or quantized data, else `dtype`.
- The size limit (`max_bytes`) applies to the decoded tensor (after dequantization to float32: numel x 4 for
  quantized or FLOAT16 data), checked from the declared shape before anything is decompressed or allocated,
  so a small compressed or int8 request cannot expand past it. With `max_rows`, `decode_all` also bounds
  the batch dimension (shape[0]) of every tensor, and checks every tensor before it decodes any.

`decode` validates everything before it allocates anything and raises `TensorError`, whose `status` is the
grpc.StatusCode name the server answers with (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for oversize tensors).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models import wirecodec as wc
from models.manifest import TensorSpec
from models.wirecodec import COMPRESSIONS, QUANTIZERS, VALID_SPECS
from protos import inference_pb2 as pb

DEFAULT_MAX_TENSOR_BYTES = 64 * 1024 * 1024
MAX_RANK = 16
# The spec grammar in one line, for help texts: "fp32|fp16|int8|int8c[+lz4|+zstd]".
SPEC_SYNTAX = "|".join(QUANTIZERS) + "[" + "|".join(f"+{c}" for c in COMPRESSIONS if c != "none") + "]"

INVALID_ARGUMENT = "INVALID_ARGUMENT"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"

# Wire dtype -> little-endian numpy dtype.
_NP_DTYPES: dict[pb.DType, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT8: np.dtype("i1"),
    pb.UINT8: np.dtype("u1"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
}
_DTYPE_BY_NAME: dict[str, pb.DType] = {np.dtype(d).name: code for code, d in _NP_DTYPES.items()}
_QUANT_RANGE = {pb.INT8: (-128, 127), pb.UINT8: (0, 255)}
_COMPRESSION_BY_NAME = {"none": pb.COMPRESSION_NONE, "lz4": pb.LZ4, "zstd": pb.ZSTD}


class TensorError(ValueError):
    """A tensor that cannot be encoded or that failed validation; `status` is a grpc.StatusCode name."""

    def __init__(self, message: str, status: str = INVALID_ARGUMENT):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Codec:
    """A parsed codec spec: how floats are reduced (`quantizer`) and how bytes are compressed."""

    quantizer: str = "fp32"
    compression: str = "none"

    @property
    def spec(self) -> str:
        """The spec string, e.g. `int8+zstd`."""
        return self.quantizer if self.compression == "none" else f"{self.quantizer}+{self.compression}"

    def __str__(self) -> str:
        return self.spec


def parse_codec(spec: str | Codec) -> Codec:
    """Parse a codec spec like `int8+zstd`; TensorError listing the valid specs otherwise."""
    if isinstance(spec, Codec):
        return spec
    try:
        return Codec(*wc.split_spec(spec))
    except wc.WireError as exc:
        raise TensorError(str(exc)) from None


# -- encoding ------------------------------------------------------------------------------------


def encode(name: str, array: np.ndarray, codec: str | Codec = "fp32") -> pb.Tensor:
    """Encode `array` as a proto Tensor named `name` with `codec` (see the module docstring)."""
    c = parse_codec(codec)
    arr = np.asarray(array)
    if arr.dtype.name not in _DTYPE_BY_NAME and not np.issubdtype(arr.dtype, np.floating):
        raise TensorError(
            f"tensor {name!r}: dtype {arr.dtype} cannot be sent; expected one of {sorted(_DTYPE_BY_NAME)}"
        )
    if arr.ndim > MAX_RANK:
        raise TensorError(f"tensor {name!r}: rank {arr.ndim} exceeds {MAX_RANK}")
    t = pb.Tensor(name=name, shape=arr.shape)
    if np.issubdtype(arr.dtype, np.floating):
        t.logical_dtype = pb.FLOAT32
        if c.quantizer == "fp16":
            arr, t.dtype = arr.astype("<f2", copy=False), pb.FLOAT16
        elif c.quantizer in ("int8", "int8c"):
            try:
                q, scale, zero, axis = wc.quantize(arr, c.quantizer)
            except wc.WireError as exc:
                raise TensorError(f"tensor {name!r}: {exc}") from None
            arr, t.dtype = q, pb.INT8
            t.quantization.scale.extend(scale.tolist())  # type: ignore[union-attr]  # set for int8
            t.quantization.zero_point.extend(zero.tolist())  # type: ignore[union-attr]
            t.quantization.axis = -1 if axis is None else axis
        else:
            arr, t.dtype = arr.astype("<f4", copy=False), pb.FLOAT32
    else:
        code = _DTYPE_BY_NAME[arr.dtype.name]
        arr, t.dtype, t.logical_dtype = arr.astype(_NP_DTYPES[code], copy=False), code, code
    raw = wc.payload_bytes(arr)
    t.raw_size = raw.nbytes
    t.compression = _COMPRESSION_BY_NAME[c.compression]
    t.data = wc.compress(raw, c.compression)
    return t


def encode_all(arrays: Mapping[str, np.ndarray], codec: str | Codec = "fp32") -> list[pb.Tensor]:
    """Encode every named array with the same codec, in mapping order."""
    return [encode(name, arr, codec) for name, arr in arrays.items()]


# -- validation ----------------------------------------------------------------------------------


_COMPRESSIONS = frozenset(pb.Compression.values())


def _dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else str(code)


def _logical_dtype(t: pb.Tensor) -> int:
    """The dtype handed to the model, with UNSPECIFIED resolved."""
    if t.logical_dtype != pb.DTYPE_UNSPECIFIED:
        return t.logical_dtype
    if t.HasField("quantization") or t.dtype == pb.FLOAT16:
        return pb.FLOAT32
    return t.dtype


def validate(t: pb.Tensor, *, max_bytes: int, expected: TensorSpec | None = None) -> None:
    """Check a tensor's metadata against itself, `max_bytes` and `expected`, without touching its data."""
    where = f"tensor {t.name!r}"
    if t.dtype not in _NP_DTYPES:
        raise TensorError(f"{where}: dtype {_dtype_name(t.dtype)} is not one of {sorted(pb.DType.keys())[1:]}")
    if t.compression not in _COMPRESSIONS:
        raise TensorError(f"{where}: compression {t.compression} is not one of {list(pb.Compression.keys())}")
    shape = list(t.shape)
    if len(shape) > MAX_RANK:
        raise TensorError(f"{where}: rank {len(shape)} exceeds {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise TensorError(f"{where}: shape {shape} has a negative dimension")
    itemsize = _NP_DTYPES[t.dtype].itemsize
    numel = math.prod(shape)  # Python ints: no overflow however large the dims
    nbytes = numel * itemsize
    if nbytes != t.raw_size:
        raise TensorError(
            f"{where}: shape {shape} of {_dtype_name(t.dtype)} is {nbytes} bytes but raw_size says {t.raw_size}"
        )
    logical = _logical_dtype(t)
    logical_np = _NP_DTYPES.get(logical)  # type: ignore[call-overload]  # a wire int, maybe unknown (refused below)
    decoded = numel * max(itemsize, logical_np.itemsize if logical_np is not None else itemsize)
    if decoded > max_bytes:
        raise TensorError(
            f"{where}: shape {shape} decodes to {decoded} bytes, which exceeds the limit of {max_bytes} bytes",
            RESOURCE_EXHAUSTED,
        )
    if t.compression == pb.COMPRESSION_NONE and len(t.data) != nbytes:
        raise TensorError(f"{where}: data is {len(t.data)} bytes, expected raw_size {nbytes}")
    if t.compression != pb.COMPRESSION_NONE and len(t.data) > max_bytes:
        raise TensorError(f"{where}: compressed data of {len(t.data)} bytes exceeds {max_bytes}", RESOURCE_EXHAUSTED)
    if t.HasField("quantization"):
        _validate_quantization(t, shape, logical)
    elif not (logical == t.dtype or (t.dtype == pb.FLOAT16 and logical == pb.FLOAT32)):
        raise TensorError(
            f"{where}: logical_dtype {_dtype_name(logical)} needs quantization or a FLOAT16 payload; "
            f"dtype is {_dtype_name(t.dtype)}"
        )
    if expected is not None:
        _validate_expected(t, shape, logical, expected)


def _validate_quantization(t: pb.Tensor, shape: list[int], logical: int) -> None:
    where = f"tensor {t.name!r}"
    q = t.quantization
    if t.dtype not in _QUANT_RANGE:
        raise TensorError(f"{where}: quantized data must be INT8 or UINT8, got {_dtype_name(t.dtype)}")
    if logical != pb.FLOAT32:
        raise TensorError(f"{where}: quantized data must have logical_dtype FLOAT32, got {_dtype_name(logical)}")
    if q.axis == -1:
        want = 1
    elif 0 <= q.axis < len(shape):
        want = shape[q.axis]
    else:
        raise TensorError(f"{where}: quantization axis {q.axis} is not -1 or a dimension of shape {shape}")
    if len(q.scale) != want or len(q.zero_point) != want:
        raise TensorError(
            f"{where}: quantization along axis {q.axis} needs {want} scales and zero points, "
            f"got {len(q.scale)} and {len(q.zero_point)}"
        )
    if want == 1:  # per tensor, the common case: no array for one number
        s = float(np.float32(q.scale[0]))
        finite_positive = math.isfinite(s) and s > 0
    else:
        scales = np.asarray(q.scale, np.float32)
        finite_positive = bool(np.isfinite(scales).all() and (scales > 0).all())
    if not finite_positive:
        raise TensorError(f"{where}: quantization scales must be finite and > 0")
    lo, hi = _QUANT_RANGE[t.dtype]
    if any(z < lo or z > hi for z in q.zero_point):
        raise TensorError(f"{where}: zero points must lie in [{lo}, {hi}] for {_dtype_name(t.dtype)}")


def _validate_expected(t: pb.Tensor, shape: list[int], logical: int, spec: TensorSpec) -> None:
    where = f"tensor {t.name!r}"
    if t.name != spec.name:
        raise TensorError(f"{where}: expected tensor {spec.name!r}")
    want = _DTYPE_BY_NAME.get(spec.dtype)
    if want is not None and logical != want:
        raise TensorError(f"{where}: logical dtype {_dtype_name(logical)}, the model expects {spec.dtype}")
    if len(shape) != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape, shape)):
        expect = ["batch" if d is None else d for d in spec.shape]
        raise TensorError(f"{where}: shape {shape} does not match the model's {expect}")


# -- decoding ------------------------------------------------------------------------------------


def _decompress(t: pb.Tensor) -> bytes:
    """The decompressed payload; never more than raw_size bytes are produced."""
    try:
        return wc.decompress(t.data, "lz4" if t.compression == pb.LZ4 else "zstd", t.raw_size)
    except wc.WireError as exc:
        raise TensorError(f"tensor {t.name!r}: {exc}") from None


def decode(
    t: pb.Tensor, *, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, expected: TensorSpec | None = None
) -> np.ndarray:
    """Validate then decode a proto Tensor to numpy: float32 for float and quantized data, else its own dtype."""
    validate(t, max_bytes=max_bytes, expected=expected)
    return _decode_checked(t)


def _decode_checked(t: pb.Tensor) -> np.ndarray:
    """Decode a tensor `validate` has passed."""
    raw = t.data if t.compression == pb.COMPRESSION_NONE else _decompress(t)
    arr = np.frombuffer(raw, dtype=_NP_DTYPES[t.dtype]).reshape(tuple(t.shape))  # zero-copy view
    if t.HasField("quantization"):
        q = t.quantization
        return wc.dequantize(arr, q.scale, q.zero_point, None if q.axis < 0 else q.axis)
    if t.dtype == pb.FLOAT16:
        return arr.astype(np.float32)
    return arr


def check_all(
    tensors: Iterable[pb.Tensor],
    expected: Sequence[TensorSpec] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    max_rows: int | None = None,
) -> int:
    """Validate a request's tensors without decoding any; returns the decoded bytes they will take.

    With `expected`: exactly those names, each checked against its spec. With `max_rows`: every tensor has a
    batch dimension (rank >= 1), they agree on it, and it is at most `max_rows` (INVALID_ARGUMENT otherwise).
    """
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise TensorError(f"duplicate tensor names in {names}")
    specs = None if expected is None else {s.name: s for s in expected}
    if specs is not None and set(names) != set(specs):
        raise TensorError(f"got tensors {sorted(names)}, expected {sorted(specs)}")
    total = 0
    for t in tensors:
        validate(t, max_bytes=max_bytes, expected=None if specs is None else specs[t.name])
        total += math.prod(t.shape) * 4
    if max_rows is not None:
        if any(len(t.shape) == 0 for t in tensors):
            raise TensorError(f"tensors {sorted(names)}: every tensor needs a batch dimension (rank >= 1)")
        rows = sorted({t.shape[0] for t in tensors})
        if len(rows) > 1:
            raise TensorError(f"tensors disagree on the batch dimension: {rows}")
        if rows and rows[0] > max_rows:
            raise TensorError(f"batch of {rows[0]} rows exceeds this server's max_batch of {max_rows}; "
                              "send at most that many rows per request")
    return total


def decode_all(
    tensors: Iterable[pb.Tensor],
    expected: Sequence[TensorSpec] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    max_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode a request's tensors by name, after `check_all` has checked every one of them (see there)."""
    tensors = list(tensors)
    check_all(tensors, expected, max_bytes=max_bytes, max_rows=max_rows)
    return {t.name: _decode_checked(t) for t in tensors}


def wire_bytes(tensors: Iterable[pb.Tensor]) -> int:
    """Bytes of tensor payload on the wire (after compression), the quantity link time depends on."""
    return sum(len(t.data) for t in tensors)


__all__ = [
    "DEFAULT_MAX_TENSOR_BYTES",
    "SPEC_SYNTAX",
    "VALID_SPECS",
    "Codec",
    "TensorError",
    "check_all",
    "decode",
    "decode_all",
    "encode",
    "encode_all",
    "parse_codec",
    "validate",
    "wire_bytes",
]
