"""protos.codec: round trips per codec with their error bounds, and every validation failure."""

from __future__ import annotations

import lz4.block
import numpy as np
import pytest
import zstandard

from models.manifest import TensorSpec
from protos import codec
from protos import inference_pb2 as pb
from protos.codec import TensorError, decode, decode_all, encode, parse_codec, validate

RNG = np.random.default_rng(0)
ACT = np.maximum(RNG.standard_normal((2, 8, 6, 5)), 0).astype(np.float32)  # post-ReLU-like
SIGNED = (RNG.standard_normal((3, 4, 5)) * np.array([0.1, 1.0, 10.0, 3.0])[None, :, None]).astype(np.float32)
SPEC = TensorSpec("act", (None, 8, 6, 5), "float32")


def _err(t: pb.Tensor, **kw) -> TensorError:
    with pytest.raises(TensorError) as info:
        decode(t, **kw)
    return info.value


# -- specs ---------------------------------------------------------------------------------------


def test_parse_codec_accepts_every_valid_spec() -> None:
    for spec in codec.VALID_SPECS:
        assert parse_codec(spec).spec == spec
    assert parse_codec("INT8+ZSTD").spec == "int8+zstd"


@pytest.mark.parametrize("bad", ["", "int4", "fp32+gzip", "int8+", "fp32+none", "+zstd", "int8+zstd+lz4"])
def test_parse_codec_rejects_with_the_valid_list(bad: str) -> None:
    with pytest.raises(TensorError, match="int8c\\+zstd"):
        parse_codec(bad)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["", "+lz4", "+zstd"])
@pytest.mark.parametrize("x", [ACT, SIGNED], ids=["relu", "signed"])
def test_round_trip_error_bounds(x: np.ndarray, compression: str) -> None:
    exact = decode(encode("a", x, "fp32" + compression))
    assert exact.dtype == np.float32 and np.array_equal(exact, x)

    half = decode(encode("a", x, "fp16" + compression))
    assert half.dtype == np.float32 and half.shape == x.shape
    np.testing.assert_allclose(half, x, rtol=1e-3, atol=1e-4)

    t = encode("a", x, "int8" + compression)
    scale = t.quantization.scale[0]
    assert t.dtype == pb.INT8 and t.logical_dtype == pb.FLOAT32 and t.quantization.axis == -1
    assert np.abs(decode(t) - x).max() <= scale / 2 + 1e-6

    t = encode("a", x, "int8c" + compression)
    scales = np.asarray(t.quantization.scale).reshape(1, -1, *([1] * (x.ndim - 2)))
    assert t.quantization.axis == 1 and len(t.quantization.scale) == x.shape[1]
    assert (np.abs(decode(t) - x) <= scales / 2 + 1e-6).all()


def test_per_channel_beats_per_tensor_on_uneven_channels() -> None:
    per_tensor = np.abs(decode(encode("a", SIGNED, "int8")) - SIGNED)[:, 0].max()
    per_channel = np.abs(decode(encode("a", SIGNED, "int8c")) - SIGNED)[:, 0].max()
    assert per_channel < per_tensor / 10


def test_compression_shrinks_sparse_activations_and_keeps_raw_size() -> None:
    t = encode("a", ACT, "int8+zstd")
    assert t.compression == pb.ZSTD and t.raw_size == ACT.size and len(t.data) < ACT.size
    assert codec.wire_bytes([t]) == len(t.data)


@pytest.mark.parametrize("x", [np.arange(12, dtype=np.int64).reshape(3, 4), np.arange(5, dtype=np.uint8),
                               np.array([-1, 2], dtype=np.int32), np.array([1, -2], dtype=np.int8)])
def test_integer_arrays_travel_losslessly_whatever_the_codec(x: np.ndarray) -> None:
    for spec in ("fp32", "int8+zstd", "fp16+lz4"):
        y = decode(encode("ids", x, spec))
        assert y.dtype == x.dtype and np.array_equal(y, x)


def test_edge_cases_round_trip() -> None:
    zeros = np.zeros((1, 3, 2, 2), np.float32)
    for spec in ("int8", "int8c", "int8+zstd", "fp16+lz4"):
        assert np.array_equal(decode(encode("z", zeros, spec)), zeros)
    empty = np.zeros((0, 4), np.float32)
    for spec in codec.VALID_SPECS:
        assert decode(encode("e", empty, spec)).shape == (0, 4)
    f64 = RNG.standard_normal((2, 3))
    assert decode(encode("d", f64)).dtype == np.float32


def test_uncompressed_fp32_decodes_zero_copy() -> None:
    t = encode("a", ACT)
    y = decode(t)
    assert not y.flags.owndata and not y.flags.writeable  # a view over the message's bytes


def test_encode_refusals() -> None:
    with pytest.raises(TensorError, match="rank >= 2"):
        encode("v", np.ones(3, np.float32), "int8c")
    with pytest.raises(TensorError, match="non-finite"):
        encode("v", np.array([1.0, np.nan], np.float32), "int8")
    with pytest.raises(TensorError, match="cannot be sent"):
        encode("v", np.array([True]), "fp32")


# -- validation failures -------------------------------------------------------------------------


def test_unknown_dtype() -> None:
    t = encode("a", ACT)
    t.dtype = 99
    assert "dtype 99" in str(_err(t))
    t.dtype = pb.DTYPE_UNSPECIFIED
    assert _err(t).status == "INVALID_ARGUMENT"


def test_unknown_compression() -> None:
    t = encode("a", ACT)
    t.compression = 7
    assert "compression 7" in str(_err(t))


def test_negative_dimension() -> None:
    t = encode("a", ACT)
    t.shape[1] = -8
    assert "negative" in str(_err(t))


def test_rank_limit() -> None:
    t = pb.Tensor(name="a", dtype=pb.FLOAT32, shape=[1] * 17, raw_size=4, data=b"\0" * 4)
    assert "rank 17" in str(_err(t))


def test_shape_raw_size_mismatch() -> None:
    t = encode("a", ACT)
    t.raw_size += 4
    assert "raw_size" in str(_err(t))
    t = encode("a", ACT)
    t.shape[0] = 3
    assert _err(t).status == "INVALID_ARGUMENT"


def test_huge_dims_do_not_overflow() -> None:
    # prod overflows int64: must be a clean mismatch, not a wrap-around that happens to match.
    t = pb.Tensor(name="a", dtype=pb.FLOAT32, shape=[2**62, 2**62, 4], raw_size=0, data=b"")
    assert "raw_size" in str(_err(t))


def test_data_length_mismatch() -> None:
    t = encode("a", ACT)
    t.data = t.data[:-1]
    assert "data is" in str(_err(t))


def test_oversize_is_resource_exhausted() -> None:
    t = encode("a", ACT)
    err = _err(t, max_bytes=ACT.nbytes - 1)
    assert err.status == "RESOURCE_EXHAUSTED" and "exceeds" in str(err)
    big = pb.Tensor(name="b", dtype=pb.FLOAT32, shape=[1 << 30], raw_size=4 << 30, data=b"")
    assert _err(big).status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("compression", ["zstd", "zstd-nosize", "lz4"])
def test_zip_bomb_is_refused(compression: str) -> None:
    bomb = bytes(64 * 1024 * 1024)  # claims 1 KiB, inflates to 64 MiB
    if compression == "lz4":
        data, comp = lz4.block.compress(bomb, store_size=False), pb.LZ4
    else:
        write_size = compression == "zstd"
        data, comp = zstandard.ZstdCompressor(level=1, write_content_size=write_size).compress(bomb), pb.ZSTD
    t = pb.Tensor(name="bomb", dtype=pb.UINT8, shape=[1024], raw_size=1024, data=data, compression=comp)
    err = _err(t)
    assert err.status == "INVALID_ARGUMENT" and "bomb" in str(err)


def test_compressed_data_shorter_or_corrupt() -> None:
    t = encode("a", ACT, "fp32+zstd")
    t.raw_size, t.shape[0] = t.raw_size * 2, 4  # consistent metadata, too little data
    assert "decompresses" in str(_err(t))
    t = encode("a", ACT, "fp32+lz4")
    t.data = b"\xff" * 16
    assert "lz4" in str(_err(t))
    t = encode("a", ACT, "fp32+zstd")
    t.data = b"not zstd at all"
    assert "zstd" in str(_err(t))


def test_bad_quantization() -> None:
    base = encode("a", ACT, "int8c")
    cases = {
        "scales and zero points": lambda t: t.quantization.scale.pop(),
        "finite and > 0": lambda t: t.quantization.scale.__setitem__(0, 0.0),
        "axis 7": lambda t: setattr(t.quantization, "axis", 7),
        "zero points must lie": lambda t: t.quantization.zero_point.__setitem__(0, 300),
        "INT8 or UINT8": lambda t: (setattr(t, "dtype", pb.INT32), setattr(t, "raw_size", ACT.size * 4),
                                    setattr(t, "data", b"\0" * ACT.size * 4)),
        "logical_dtype FLOAT32": lambda t: setattr(t, "logical_dtype", pb.INT8),
    }
    for message, corrupt in cases.items():
        t = pb.Tensor()
        t.CopyFrom(base)
        corrupt(t)
        assert message in str(_err(t)), message
    t = encode("a", ACT, "int8")
    t.quantization.scale[0] = float("nan")
    assert "finite" in str(_err(t))
    t = encode("a", ACT, "int8")
    t.quantization.axis = 0  # axis 0 with one scale but a batch of 2
    assert "needs 2 scales" in str(_err(t))


def test_logical_dtype_without_quantization() -> None:
    t = encode("a", ACT)
    t.logical_dtype = pb.INT64
    assert "logical_dtype" in str(_err(t))


def test_expected_spec() -> None:
    decode(encode("act", ACT, "int8"), expected=SPEC)  # batch dimension is free
    assert "expected tensor 'act'" in str(_err(encode("other", ACT), expected=SPEC))
    assert "does not match" in str(_err(encode("act", ACT[:, :4]), expected=SPEC))
    assert "does not match" in str(_err(encode("act", ACT[0]), expected=SPEC))
    assert "model expects float32" in str(_err(encode("act", ACT.astype(np.int32)), expected=SPEC))


def test_validate_touches_no_data() -> None:
    t = encode("act", ACT, "int8+zstd")
    t.data = b"garbage that validate must not read"
    validate(t, max_bytes=1 << 20, expected=SPEC)


def test_decode_all_names() -> None:
    ts = [encode("act", ACT)]
    assert set(decode_all(ts, [SPEC])) == {"act"}
    with pytest.raises(TensorError, match="expected \\['act'\\]"):
        decode_all([encode("x", ACT)], [SPEC])
    with pytest.raises(TensorError, match="duplicate"):
        decode_all(ts * 2)


# -- what a request can cost: decoded size and rows, from the metadata alone ---------------------------


@pytest.mark.parametrize("spec", ["int8+zstd", "int8c+lz4", "fp16+zstd", "int8"])
def test_the_limit_is_on_the_decoded_float32_size(spec: str) -> None:
    t = encode("act", ACT, spec)  # 1 or 2 bytes per element on the wire, 4 once decoded
    assert t.raw_size < ACT.nbytes
    err = _err(t, max_bytes=ACT.nbytes - 1)
    assert err.status == "RESOURCE_EXHAUSTED" and f"decodes to {ACT.nbytes} bytes" in str(err)
    assert decode(t, max_bytes=ACT.nbytes).shape == ACT.shape


def test_a_tiny_int8_zstd_bomb_is_refused_before_decompressing() -> None:
    # 64 MiB of int8 (within the limit) declared, 256 MiB once dequantized; the data is not even zstd:
    # the refusal comes from the declared shape alone, before any decompression
    t = pb.Tensor(name="act", dtype=pb.INT8, logical_dtype=pb.FLOAT32, shape=[1 << 20, 8, 8], raw_size=64 << 20,
                  compression=pb.ZSTD, data=b"not zstd")
    t.quantization.scale.append(1.0)
    t.quantization.zero_point.append(0)
    t.quantization.axis = -1
    err = _err(t, max_bytes=64 << 20)
    assert err.status == "RESOURCE_EXHAUSTED" and str(256 << 20) in str(err)


def test_rows_are_bounded_and_every_tensor_checked_before_any_decodes() -> None:
    ts = [encode("act", ACT)]  # 2 rows
    assert decode_all(ts, [SPEC], max_rows=2)["act"].shape[0] == 2
    err = pytest.raises(TensorError, decode_all, ts, [SPEC], max_rows=1).value
    assert err.status == "INVALID_ARGUMENT" and "max_batch of 1" in str(err)
    two = [encode("a", ACT), encode("b", ACT[:1])]
    assert "disagree" in str(pytest.raises(TensorError, decode_all, two, max_rows=8).value)
    scalar = [encode("s", np.float32(1.0))]
    assert "batch dimension" in str(pytest.raises(TensorError, decode_all, scalar, max_rows=8).value)
    # the second tensor is refused before the first (whose data is corrupt) is decompressed
    corrupt = encode("a", ACT, "fp32+zstd")
    corrupt.data = b"corrupt"
    big = encode("b", np.zeros((2, 1024), np.float32))
    err = pytest.raises(TensorError, decode_all, [corrupt, big], max_bytes=ACT.nbytes).value
    assert err.status == "RESOURCE_EXHAUSTED" and "'b'" in str(err)
    assert codec.check_all([encode("a", ACT, "int8")], max_rows=2) == ACT.nbytes
