"""What one request can cost the cloud, over real gRPC on 127.0.0.1: decoded size and rows refused before
allocation, long ids refused, large decodes off the event loop, and a tail that runs out of memory."""

from __future__ import annotations

import threading
import tracemalloc
from pathlib import Path

import grpc
import numpy as np
import pytest
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_tier import CloudServer
from cloud_tier.executor import TailExecutor
from models.tiny_bundle import CUT_TENSOR, MID_CUT, make_tiny_bundle
from protos import codec, serde
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.pki import device_channel

DEADLINE_S = 30.0
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
OK, INVALID, EXHAUSTED = 0, 3, 8
ROW = 8 * 16 * 16  # elements of one row of the tiny bundle's cut tensor (N, 8, 16, 16)


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    make_tiny_bundle(root / "tiny")
    return root


def _request(rid: str, rows: int, codec_spec: str = "fp32", **fields: str) -> pb.InferRequest:
    array = np.random.default_rng(0).random((rows, 8, 16, 16), dtype=np.float32)
    base = {"request_id": rid, "device_id": "test", "model": "tiny", "cut": MID_CUT}
    return pb.InferRequest(**{**base, **fields}, tensors=[codec.encode(CUT_TENSOR, array, codec_spec)])


def _infer(channel: grpc.Channel, requests: list[pb.InferRequest]) -> list[pb.InferResponse]:
    return list(pb_grpc.SplitInferenceStub(channel).Infer(iter(requests), timeout=DEADLINE_S))


def _bomb(rows: int) -> pb.Tensor:
    """A zstd int8 tensor of the cut's shape: a few KB on the wire, rows * ROW bytes raw, 4x that decoded."""
    raw = bytes(rows * ROW)
    t = pb.Tensor(name=CUT_TENSOR, shape=[rows, 8, 16, 16], dtype=pb.INT8, logical_dtype=pb.FLOAT32,
                  raw_size=len(raw), compression=pb.ZSTD, data=zstandard.ZstdCompressor().compress(raw))
    t.quantization.scale.append(0.1)
    t.quantization.zero_point.append(0)
    t.quantization.axis = -1
    return t


def test_a_small_request_declaring_a_huge_decoded_tensor_is_refused_before_allocation(bundles_dir: Path) -> None:
    # int8 of 2048 rows: 4 MiB raw (under the 8 MiB limit), 16 MiB once dequantized to float32 (over it).
    bomb = pb.InferRequest(request_id="bomb", device_id="test", model="tiny", cut=MID_CUT, tensors=[_bomb(2048)])
    assert bomb.ByteSize() < 64 * 1024
    with CloudServer(bundles_dir, max_batch=4096, max_tensor_bytes=8 << 20) as server, \
            device_channel(server.address, "test", OPTIONS) as channel:
        _infer(channel, [_request("warm", 1)])  # warm the path: first-call allocations do not count
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            (reply,) = _infer(channel, [bomb])
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    assert reply.status.code == EXHAUSTED, reply.status
    assert "decodes to 16777216 bytes" in reply.status.message and "8388608" in reply.status.message
    assert peak < 2 << 20, f"{peak} bytes allocated while refusing it"


def test_more_rows_than_max_batch_is_refused(bundles_dir: Path) -> None:
    with CloudServer(bundles_dir, max_batch=4) as server, \
            device_channel(server.address, "test", OPTIONS) as channel:
        replies = {r.request_id: r for r in _infer(channel, [_request("five", 5), _request("four", 4)])}
        # zstd-compressed int8 rows: refused on the declared shape, before decompressing
        (bomb,) = _infer(channel, [pb.InferRequest(request_id="b", model="tiny", cut=MID_CUT, tensors=[_bomb(64)])])
    assert replies["five"].status.code == INVALID and "max_batch of 4" in replies["five"].status.message
    assert replies["four"].status.code == OK and len(replies["four"].outputs) == 1
    assert bomb.status.code == INVALID and "max_batch" in bomb.status.message


def test_over_long_ids_and_names_are_refused_and_not_echoed(bundles_dir: Path) -> None:
    long = "x" * 4096
    with CloudServer(bundles_dir) as server, device_channel(server.address, "test", OPTIONS) as channel:
        replies = _infer(channel, [
            _request(long, 1), _request("m", 1, model=long), _request("c", 1, cut=long),
            _request("d", 1, device_id=long), _request("fine", 1),
        ])
    by_id = {r.request_id: r for r in replies}
    assert set(by_id) == {"x" * serde.MAX_ID_CHARS, "m", "c", "d", "fine"}
    for rid, field in (("x" * serde.MAX_ID_CHARS, "request_id"), ("m", "model"), ("c", "cut"), ("d", "device_id")):
        assert by_id[rid].status.code == INVALID and field in by_id[rid].status.message
        assert long not in by_id[rid].status.message
    assert by_id["fine"].status.code == OK


def test_other_streams_are_answered_while_a_large_request_decodes(bundles_dir: Path, monkeypatch) -> None:
    entered, release = threading.Event(), threading.Event()
    original = codec._decode_checked

    def slow_decode(t: pb.Tensor) -> np.ndarray:
        if t.raw_size > 64 * 1024:  # the large request: hold its decode until the test has seen the others
            entered.set()
            release.wait(DEADLINE_S)
        return original(t)

    monkeypatch.setattr(codec, "_decode_checked", slow_decode)
    with CloudServer(bundles_dir, max_batch=16) as server, \
            device_channel(server.address, "test", OPTIONS) as first, \
            device_channel(server.address, "test", OPTIONS) as second:
        big: list[pb.InferResponse] = []
        sender = threading.Thread(target=lambda: big.extend(_infer(first, [_request("big", 16)])))
        sender.start()
        try:
            assert entered.wait(DEADLINE_S), "the large request never started decoding"
            health = health_pb2_grpc.HealthStub(second).Check(health_pb2.HealthCheckRequest(), timeout=5)
            small = _infer(second, [_request("small", 1), pb.InferRequest(request_id="p", probe=True)])
            assert not release.is_set()  # answered while the large decode was still held
        finally:
            release.set()
            sender.join(DEADLINE_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert sorted((r.request_id, r.status.code) for r in small) == [("p", OK), ("small", OK)]
    assert [(r.request_id, r.status.code) for r in big] == [("big", OK)]


def test_a_tail_that_runs_out_of_memory_answers_and_the_stream_goes_on(bundles_dir: Path, monkeypatch) -> None:
    def no_memory(self: TailExecutor, feeds: dict) -> dict:
        raise MemoryError

    monkeypatch.setattr(TailExecutor, "run", no_memory)
    with CloudServer(bundles_dir, max_batch=4, max_wait_ms=50) as server, \
            device_channel(server.address, "test", OPTIONS) as channel:
        requests = [_request(f"r{i}", 1) for i in range(6)] + [pb.InferRequest(request_id="p", probe=True)]
        replies = {r.request_id: r for r in _infer(channel, requests)}  # the stream ends: every request answered
        again = _infer(channel, [pb.InferRequest(request_id="p2", probe=True), _request("r6", 1)])
    assert sorted(replies) == sorted(r.request_id for r in requests)
    for i in range(6):
        assert replies[f"r{i}"].status.code == EXHAUSTED and "out of memory" in replies[f"r{i}"].status.message
    assert replies["p"].status.code == OK
    assert {r.request_id: r.status.code for r in again} == {"p2": OK, "r6": EXHAUSTED}
    assert server.stats.snapshot()["errors"]["RESOURCE_EXHAUSTED"] >= 7
