"""LinkProxy on loopback: bytes unchanged, rate and delay as lower bounds, blackhole, reset, gRPC through it."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloud_tier import CloudServer
from cloud_tier.lab.linkproxy import LinkProxy
from models.tiny_bundle import CUT_TENSOR, MID_CUT, make_tiny_bundle, sample_input
from protos import codec
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests import polling

DEADLINE_S = 20.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(DEADLINE_S)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass  # the proxy reset us: that is what some tests do


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def echo() -> Iterator[int]:
    srv = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    thread.join(DEADLINE_S)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = s.recv(min(65536, n - got))
        if not chunk:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _echo_round_trip(s: socket.socket, payload: bytes) -> bytes:
    sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
    sender.start()
    back = _recv_exactly(s, len(payload))
    sender.join(DEADLINE_S)
    return back


def _wait_for(cond, timeout: float = DEADLINE_S) -> bool:
    polling.wait_for(cond, "the proxy's condition", timeout, interval_s=0.01)
    return True


def test_bytes_pass_unchanged_both_ways(echo: int) -> None:
    payload = os.urandom(300_000)
    with LinkProxy("127.0.0.1", echo) as proxy, _connect(proxy.port) as s:
        assert _echo_round_trip(s, payload) == payload
        assert _echo_round_trip(s, b"x") == b"x"
        total = len(payload) + 1  # the counters move just after the write: the echo may beat them to us
        assert _wait_for(lambda: proxy.stats().uplink_bytes == proxy.stats().downlink_bytes == total)
        assert proxy.stats().accepted == 1


def test_uplink_rate_is_a_lower_bound_on_transfer_time(echo: int) -> None:
    size, mbps = 50_000, 1.0
    floor_s = (size - 1500) * 8 / (mbps * 1e6)  # the bucket's burst is one frame
    with LinkProxy("127.0.0.1", echo, uplink_mbps=mbps) as proxy, _connect(proxy.port) as s:
        t0 = time.perf_counter()
        assert _echo_round_trip(s, os.urandom(size))
        assert time.perf_counter() - t0 >= floor_s


def test_delay_applies_each_way_and_runtime_changes_apply(echo: int) -> None:
    with LinkProxy("127.0.0.1", echo, delay_ms=40, jitter_ms=5, seed=1) as proxy, _connect(proxy.port) as s:
        data = bytes(range(256)) * 40
        t0 = time.perf_counter()
        assert _echo_round_trip(s, data) == data  # jitter never reorders bytes
        assert time.perf_counter() - t0 >= 2 * (0.040 - 0.005)
        proxy.set_delay(0.0, jitter_ms=0.0)
        proxy.set_rates(0.5, None)
        t0 = time.perf_counter()
        assert _echo_round_trip(s, data) == data
        assert time.perf_counter() - t0 >= (len(data) - 1500) * 8 / 0.5e6


def test_blackhole_stalls_without_closing_then_resumes(echo: int) -> None:
    with LinkProxy("127.0.0.1", echo) as proxy, _connect(proxy.port) as s:
        assert _echo_round_trip(s, b"hello") == b"hello"
        proxy.blackhole(True)
        s.sendall(b"stalled")
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):  # nothing comes back, and the socket is not closed (b"" would be)
            s.recv(16)
        assert proxy.active_connections == 1
        proxy.blackhole(False)
        s.settimeout(DEADLINE_S)
        assert _recv_exactly(s, 7) == b"stalled"


def test_reset_closes_every_connection(echo: int) -> None:
    with LinkProxy("127.0.0.1", echo) as proxy:
        a, b = _connect(proxy.port), _connect(proxy.port)
        with a, b:
            for s in (a, b):
                assert _echo_round_trip(s, b"ping") == b"ping"
            assert proxy.reset_all() == 2
            for s in (a, b):
                try:
                    assert s.recv(16) == b""
                except ConnectionResetError:
                    pass  # the RST itself: the expected way to hear of it
            assert _wait_for(lambda: proxy.active_connections == 0)
            assert proxy.stats().resets == 2
        with _connect(proxy.port) as c:  # the proxy itself keeps serving
            assert _echo_round_trip(c, b"again") == b"again"


def test_connections_beyond_the_bound_are_refused(echo: int) -> None:
    with LinkProxy("127.0.0.1", echo, max_connections=1) as proxy, _connect(proxy.port) as first:
        assert _echo_round_trip(first, b"1") == b"1"
        with _connect(proxy.port) as second:
            try:
                second.sendall(b"2")
                assert second.recv(16) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        assert proxy.stats().refused == 1
        assert _echo_round_trip(first, b"still") == b"still"


def test_target_closing_reaches_the_client_after_the_data() -> None:
    """A target that answers then closes (as a killed server's kernel does): data first, then EOF."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(DEADLINE_S)
                conn.recv(16)
                conn.sendall(b"bye")

        server = threading.Thread(target=serve_once, daemon=True)
        server.start()
        with LinkProxy("127.0.0.1", listener.getsockname()[1], delay_ms=10) as proxy:
            with _connect(proxy.port) as s:
                s.sendall(b"hi")
                assert _recv_exactly(s, 3) == b"bye"
                assert s.recv(16) == b""  # a half-close: the proxy keeps our direction open until we close
            assert _wait_for(lambda: proxy.active_connections == 0)
        server.join(DEADLINE_S)


def test_unreachable_target_closes_the_client() -> None:
    with socket.socket() as placeholder:  # a port nobody listens on: bound, never listening
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]
        with LinkProxy("127.0.0.1", dead_port, connect_timeout_s=2.0) as proxy, _connect(proxy.port) as s:
            try:
                assert s.recv(16) == b""
            except ConnectionResetError:
                pass
            assert _wait_for(lambda: proxy.stats().refused == 1)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"uplink_mbps": 0}, "uplink_mbps"), ({"delay_ms": -1}, "delay_ms"), ({"loss": 1.0}, "loss"),
     ({"max_connections": 0}, "max_connections")],
)
def test_bad_settings_name_the_setting(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        LinkProxy("127.0.0.1", 1, **kwargs)


# -- gRPC through the proxy ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("linkproxy-bundles")
    make_tiny_bundle(root / "tiny")
    return root


def test_grpc_infer_through_the_proxy(tiny_bundles: Path, device_channel) -> None:
    head = ort.InferenceSession(str(tiny_bundles / "tiny" / "head.onnx"), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(tiny_bundles / "tiny" / "full.onnx"), providers=["CPUExecutionProvider"])
    x = sample_input(1, 3)
    activation = head.run(None, {"input": x})[0]
    with CloudServer(tiny_bundles, max_batch=4, max_wait_ms=1) as server, \
            LinkProxy("127.0.0.1", server.port, uplink_mbps=20, delay_ms=5) as proxy, \
            device_channel(proxy.address, "test") as channel:  # mTLS end to end through the proxy
        stub = pb_grpc.SplitInferenceStub(channel)
        reqs = [pb.InferRequest(request_id=f"r{i}", device_id="test", model="tiny", cut=MID_CUT,
                                tensors=[codec.encode(CUT_TENSOR, activation, "fp32")]) for i in range(3)]
        replies = list(stub.Infer(iter(reqs), timeout=DEADLINE_S))
        assert sorted(r.request_id for r in replies) == ["r0", "r1", "r2"]
        for r in replies:
            assert r.status.code == 0, r.status.message
            out = codec.decode(r.outputs[0])
            np.testing.assert_allclose(out, full.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)
        assert proxy.stats().uplink_bytes > activation.nbytes * 3


def test_agent_through_a_blackholed_link_finishes_on_the_device(tiny_bundles: Path, device_tls) -> None:
    from edge_agent import EdgeAgent

    with CloudServer(tiny_bundles, max_batch=4, max_wait_ms=1) as server, \
            LinkProxy("127.0.0.1", server.port, delay_ms=2) as proxy:
        agent = EdgeAgent.from_bundle(tiny_bundles / "tiny", cloud=proxy.address, deadline_ms=300,
                                      backoff={"initial_s": 0.05, "max_s": 0.2}, device_id="proxied",
                                      tls=device_tls("proxied"))
        try:
            assert agent.infer(sample_input(1, 4), timeout=DEADLINE_S).served_by == "cloud"
            proxy.blackhole(True)
            stalled = agent.infer(sample_input(1, 5), timeout=DEADLINE_S)
            assert stalled.served_by == "edge" and "deadline" in (stalled.fallback_reason or "")
            proxy.blackhole(False)
            assert agent.wait_for_mode("split", DEADLINE_S)
            assert agent.infer(sample_input(1, 6), timeout=DEADLINE_S).served_by == "cloud"
        finally:
            agent.close()
