"""The numbers of the activation codecs, without the wire format: quantize, compress, and back.

`protos.codec` builds proto Tensors from these; the planner (`partitioning.codecs`) times them and measures the
bytes they make on representative activations, so that what is costed is what is sent. Only numpy and the
[edge] extra's lz4/zstandard are used.

A spec is `quantizer[+compression]`: quantizers `fp32`, `fp16`, `int8` (affine, one scale per tensor), `int8c`
(affine, one scale per channel along axis 1); compressions `lz4` (block format, no stored size) and `zstd`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.extras import require
from models.plandoc import CODECS, COMPRESSIONS, split_codec_spec

ZSTD_LEVEL = 1  # ~1.7x on post-ReLU int8 for <1 ms (DESIGN field notes); higher levels rarely pay on a link
QUANTIZERS = CODECS  # the codec names are the plan's (models.plandoc.CODECS); compression is the wire's
VALID_SPECS = tuple(q if c == "none" else f"{q}+{c}" for q in QUANTIZERS for c in COMPRESSIONS)
LOSSY = frozenset({"fp16", "int8", "int8c"})  # quantizers that change the values (compression never does)


class WireError(ValueError):
    """A payload that cannot be quantized or decompressed as asked (protos.codec names the tensor)."""


def split_spec(spec: str) -> tuple[str, str]:
    """(quantizer, compression) of a spec like `int8+zstd`; WireError for anything else."""
    parts = split_codec_spec(str(spec))
    if parts is None:
        raise WireError(f"unknown codec {spec!r}; expected one of {', '.join(VALID_SPECS)}")
    return parts


def affine_int8(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric int8 quantization (range widened to include 0); returns q, scales, zero points."""
    if axis is None:
        lo, hi = np.minimum(x.min(), 0.0), np.maximum(x.max(), 0.0)
    else:
        reduce = tuple(i for i in range(x.ndim) if i != axis)
        lo = np.minimum(x.min(axis=reduce), 0.0)
        hi = np.maximum(x.max(axis=reduce), 0.0)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    scale = (hi - lo) / 255.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero tensor still gets a valid scale
    zero = np.clip(np.round(-128.0 - lo / scale), -128, 127).astype(np.int32)
    if axis is None:
        q = np.round(x / scale) + zero
    else:
        bshape = [1] * x.ndim
        bshape[axis] = -1
        q = np.round(x / scale.reshape(bshape)) + zero.reshape(bshape)
    return np.clip(q, -128, 127).astype(np.int8), scale.reshape(-1), zero.reshape(-1)


def quantize(arr: np.ndarray, quantizer: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int | None]:
    """A float array reduced by `quantizer`: (payload, scales, zero points, axis); scales None when not int8.

    WireError for int8c below rank 2 and for non-finite values under int8/int8c.
    """
    if quantizer == "fp16":
        return arr.astype("<f2", copy=False), None, None, None
    if quantizer in ("int8", "int8c"):
        axis = None if quantizer == "int8" else 1
        if axis is not None and arr.ndim < 2:
            raise WireError(f"codec int8c needs rank >= 2 (channels on axis 1), got {arr.shape}")
        if arr.size and not np.isfinite(arr).all():
            raise WireError("cannot int8-quantize non-finite values")
        if arr.size == 0:  # nothing to measure a range on: identity parameters
            count = 1 if axis is None else arr.shape[1]
            return arr.astype(np.int8), np.ones(count, np.float32), np.zeros(count, np.int32), axis
        q, scale, zero = affine_int8(arr.astype(np.float32, copy=False), axis)
        return q, scale, zero, axis
    return arr.astype("<f4", copy=False), None, None, None


def dequantize(arr: np.ndarray, scale: Any, zero: Any, axis: int | None) -> np.ndarray:
    """float32 values of int8 data: scale * (q - zero), one scale (axis None) or one per index of `axis`."""
    out = arr.astype(np.float32)
    if axis is None:  # per tensor: scalars (float32, as the per-channel arrays are)
        out -= np.float32(zero[0])
        out *= np.float32(scale[0])
        return out
    bshape = [1] * arr.ndim
    bshape[axis] = -1
    out -= np.asarray(zero, np.float32).reshape(bshape)
    out *= np.asarray(scale, np.float32).reshape(bshape)
    return out


def payload_bytes(arr: np.ndarray) -> memoryview:
    """The array's bytes, contiguous, as compression takes them."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy 2


def compress(raw: bytes | memoryview, compression: str) -> bytes:
    """`raw` compressed (`none`: copied)."""
    if compression == "lz4":
        block = require("lz4.block", "edge")
        return block.compress(raw, store_size=False)
    if compression == "zstd":
        zstd = require("zstandard", "edge")
        return zstd.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    return bytes(raw)


def decompress(data: bytes, compression: str, size: int) -> bytes:
    """`data` decompressed to exactly `size` bytes; never more than `size` bytes are produced (WireError)."""
    if compression == "none":
        return data
    if compression == "lz4":
        block = require("lz4.block", "edge")
        if size == 0:
            return b""
        try:
            # uncompressed_size bounds the output buffer; lz4 fails rather than write past it.
            out = block.decompress(data, uncompressed_size=size)
        except block.LZ4BlockError as exc:
            raise WireError(f"lz4 data does not decompress to raw_size {size} bytes ({exc})") from exc
    else:
        zstd = require("zstandard", "edge")
        try:
            params = zstd.get_frame_parameters(data)
        except zstd.ZstdError as exc:
            raise WireError(f"not zstd data ({exc})") from exc
        # decompress() trusts a frame's declared size, so read through a bounded stream instead.
        if params.content_size not in (zstd.CONTENTSIZE_UNKNOWN, zstd.CONTENTSIZE_ERROR) and params.content_size > size:
            raise WireError(f"zstd frame declares {params.content_size} bytes, raw_size is {size}")
        reader = zstd.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        chunks, total = [], 0
        try:
            while total <= size:
                chunk = reader.read(size + 1 - total)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except zstd.ZstdError as exc:
            raise WireError(f"corrupt zstd data ({exc})") from exc
        out = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(out) != size:
        got = "more" if len(out) > size else len(out)
        raise WireError(f"data decompresses to {got} bytes, raw_size is {size}")
    return out


def round_trip(arr: np.ndarray, spec: str) -> tuple[np.ndarray, int]:
    """What the cloud gets for `arr` sent under `spec` (float32 for float arrays), and its wire bytes: the payload
    plus, for int8c, the per-channel scales and zero points."""
    quantizer, compression = split_spec(spec)
    if not np.issubdtype(arr.dtype, np.floating):
        raw = payload_bytes(arr)
        data = compress(raw, compression)
        return np.frombuffer(decompress(data, compression, raw.nbytes), arr.dtype).reshape(arr.shape), len(data)
    q, scale, zero, axis = quantize(arr, quantizer)
    raw = payload_bytes(q)
    data = compress(raw, compression)
    back = np.frombuffer(decompress(data, compression, raw.nbytes), q.dtype).reshape(q.shape)
    # per channel: a float scale and an int32 zero point each (one per tensor is in the tensor's fixed overhead)
    extra = 0 if scale is None or axis is None else 8 * len(scale)
    if scale is not None:
        return dequantize(back, scale, zero, axis), len(data) + extra
    return back.astype(np.float32), len(data)


__all__ = ["COMPRESSIONS", "LOSSY", "QUANTIZERS", "VALID_SPECS", "WireError", "ZSTD_LEVEL", "affine_int8",
           "compress", "decompress", "dequantize", "payload_bytes", "quantize", "round_trip", "split_spec"]
