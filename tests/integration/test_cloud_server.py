"""The cloud tier over real gRPC on 127.0.0.1 (port 0): outputs, batching, bad requests, health, shutdown."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_tier import CloudServer
from cloud_tier.lab.process import CHECKOUT, CloudProcess, child_env
from models.tiny_bundle import CUT_TENSOR, MID_CUT, make_tiny_bundle, sample_input
from protos import codec
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests import polling

DEADLINE_S = 30.0
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
OK, INVALID, NOT_FOUND, EXHAUSTED, UNAVAILABLE = 0, 3, 5, 8, 14


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    make_tiny_bundle(root / "tiny")
    return root


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def reference(bundles_dir: Path) -> dict[str, ort.InferenceSession]:
    b = bundles_dir / "tiny"
    return {"head": _session(b / "head.onnx"), "tail": _session(b / "tail.onnx"), "full": _session(b / "full.onnx")}


@pytest.fixture(scope="module")
def server(bundles_dir: Path) -> Iterator[CloudServer]:
    with CloudServer(bundles_dir, max_batch=16, max_wait_ms=20, max_tensor_bytes=1 << 20) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: CloudServer, device_channel) -> Iterator[pb_grpc.SplitInferenceStub]:
    with device_channel(server.address, "test", OPTIONS) as channel:
        yield pb_grpc.SplitInferenceStub(channel)


@pytest.fixture(scope="module")
def batching_server(bundles_dir: Path) -> Iterator[CloudServer]:
    # A long window with max_batch 4: a batch runs when its 4th request arrives, so batches are deterministic.
    with CloudServer(bundles_dir, max_batch=4, max_wait_ms=10_000, max_tensor_bytes=1 << 20) as srv:
        yield srv


@pytest.fixture(scope="module")
def batching_stub(batching_server: CloudServer, device_channel) -> Iterator[pb_grpc.SplitInferenceStub]:
    with device_channel(batching_server.address, "test", OPTIONS) as channel:
        yield pb_grpc.SplitInferenceStub(channel)


def _activation(reference, seed: int) -> np.ndarray:
    return reference["head"].run(None, {"input": sample_input(1, seed)})[0]


def _request(rid: str, array: np.ndarray, *, cut: str = MID_CUT, name: str = CUT_TENSOR, codec_spec: str = "fp32",
             model: str = "tiny") -> pb.InferRequest:
    return pb.InferRequest(request_id=rid, device_id="test", model=model, cut=cut,
                           tensors=[codec.encode(name, array, codec_spec)])


def _infer(stub, requests: list[pb.InferRequest]) -> dict[str, pb.InferResponse]:
    responses = {r.request_id: r for r in stub.Infer(iter(requests), timeout=DEADLINE_S)}
    assert sorted(responses) == sorted(r.request_id for r in requests)
    return responses


def _output(response: pb.InferResponse) -> np.ndarray:
    assert response.status.code == OK, response.status.message
    (out,) = response.outputs
    assert out.name == "output" and out.dtype == pb.FLOAT32
    return codec.decode(out)


def test_list_models(stub) -> None:
    served = stub.ListModels(pb.ListModelsRequest(), timeout=DEADLINE_S)
    assert {(c.model, c.cut, tuple(c.inputs)) for c in served.cuts} == {
        ("tiny", MID_CUT, (CUT_TENSOR,)), ("tiny", "cloud-only", ("input",))}


def test_outputs_match_running_the_tail_directly(stub, reference) -> None:
    act = _activation(reference, seed=5)
    x = sample_input(1, seed=6)
    int8 = codec.encode(CUT_TENSOR, act, "int8+zstd")
    res = _infer(stub, [_request("fp32", act)])  # alone: batch of one, same run as the reference
    assert np.array_equal(_output(res["fp32"]), reference["tail"].run(None, {CUT_TENSOR: act})[0])
    assert res["fp32"].timing.batch_size == 1 and res["fp32"].timing.received_unix_ns > 0
    res = _infer(stub, [_request("int8", act, codec_spec="int8+zstd")])
    want = reference["tail"].run(None, {CUT_TENSOR: codec.decode(int8)})[0]
    np.testing.assert_allclose(_output(res["int8"]), want, rtol=0, atol=1e-6)
    res = _infer(stub, [_request("cloud", x, cut="cloud-only", name="input")])
    np.testing.assert_allclose(_output(res["cloud"]), reference["full"].run(None, {"input": x})[0], atol=1e-6)


def test_a_request_with_its_own_batch_dimension(stub, reference) -> None:
    x = sample_input(3, seed=7)
    res = _infer(stub, [_request("b3", x, cut="cloud-only", name="input")])
    out = _output(res["b3"])
    assert out.shape == (3, 10) and res["b3"].timing.batch_size == 3
    np.testing.assert_allclose(out, reference["full"].run(None, {"input": x})[0], atol=1e-6)


def test_four_concurrent_streams_are_batched(batching_stub, reference, batching_server) -> None:
    stub, server = batching_stub, batching_server
    acts = [_activation(reference, seed=10 + i) for i in range(4)]
    results: dict[int, pb.InferResponse] = {}
    errors: list[BaseException] = []

    def one_stream(i: int) -> None:
        try:
            results[i] = _infer(stub, [_request(f"s{i}", acts[i])])[f"s{i}"]
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    batches_before = server.stats.snapshot().get("batches", 0)
    threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    assert not errors and len(results) == 4
    assert [r.timing.batch_size for r in results.values()] == [4] * 4
    assert server.stats.snapshot()["batches"] - batches_before == 1
    for i, r in results.items():
        alone = reference["tail"].run(None, {CUT_TENSOR: acts[i]})[0]
        # batched convolution may differ from a batch-1 run in the last bits; 1e-6 holds
        np.testing.assert_allclose(_output(r), alone, rtol=0, atol=1e-6)


def _malformed(act: np.ndarray) -> dict[str, tuple[pb.InferRequest, int, str]]:
    """Bad requests: (request, expected status code, a word of the expected message)."""
    cases: dict[str, tuple[pb.InferRequest, int, str]] = {}

    def bad(rid: str, code: int, word: str, **changes) -> pb.InferRequest:
        req = _request(rid, act, codec_spec=changes.pop("codec_spec", "fp32"))
        t = req.tensors[0]
        for key, value in changes.items():
            if key == "shape":
                del t.shape[:]
                t.shape.extend(value)
            elif key == "scale":
                t.quantization.scale[0] = value
            else:
                setattr(t, key, value)
        cases[rid] = (req, code, word)
        return req

    bad("dtype", INVALID, "dtype 42", dtype=42)
    bad("negdim", INVALID, "negative", shape=[1, -8, 16, 16])
    bad("size", INVALID, "raw_size", raw_size=act.nbytes + 4)
    bad("oversize", EXHAUSTED, "exceeds", shape=[1, 8, 16, 16 * 200], raw_size=8 * 16 * 16 * 200 * 4, data=b"")
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))
    bad("bomb", INVALID, "zstd", compression=pb.ZSTD, data=bomb)
    bad("quant", INVALID, "finite and > 0", codec_spec="int8", scale=-1.0)
    bad("wrongshape", INVALID, "does not match", shape=[1, 16, 8, 16])
    cases["model"] = (_request("model", act, model="nope"), NOT_FOUND, "served models: ['tiny']")
    cases["cut"] = (_request("cut", act, cut="c9"), NOT_FOUND, "served cuts: ['c1', 'cloud-only']")
    cases["name"] = (_request("name", act, name="relu2"), INVALID, "expected ['relu1']")
    cases["empty"] = (pb.InferRequest(request_id="empty", model="tiny", cut=MID_CUT), INVALID, "expected ['relu1']")
    return cases


def test_malformed_requests_get_their_status_and_the_stream_goes_on(batching_stub, reference, batching_server) -> None:
    stub, server = batching_stub, batching_server
    acts = [_activation(reference, seed=20 + i) for i in range(4)]
    cases = _malformed(acts[0])
    good = [_request(f"good{i}", a) for i, a in enumerate(acts)]
    bad = [req for req, _, _ in cases.values()]
    mixed = [good[0], *bad[:6], good[1], *bad[6:], good[2], good[3]]
    res = _infer(stub, mixed)
    for rid, (_, code, word) in cases.items():
        assert res[rid].status.code == code, (rid, res[rid].status)
        assert word in res[rid].status.message, (rid, res[rid].status.message)
        assert not res[rid].outputs
    # the same batch of good requests without the bad ones: the bad ones never reach a batch
    clean = _infer(stub, good)
    for i in range(4):
        assert res[f"good{i}"].timing.batch_size == clean[f"good{i}"].timing.batch_size == 4
        assert np.array_equal(_output(res[f"good{i}"]), _output(clean[f"good{i}"]))
        np.testing.assert_allclose(_output(res[f"good{i}"]),
                                   reference["tail"].run(None, {CUT_TENSOR: acts[i]})[0], rtol=0, atol=1e-6)
    errors = server.stats.snapshot()["errors"]
    assert errors["INVALID_ARGUMENT"] >= 8 and errors["NOT_FOUND"] >= 2 and errors["RESOURCE_EXHAUSTED"] >= 1


def test_probe_without_tensors_is_answered(stub) -> None:
    res = _infer(stub, [pb.InferRequest(request_id="p", probe=True)])
    assert res["p"].status.code == OK and not res["p"].outputs


def _poll(condition, what: str, timeout: float = DEADLINE_S) -> None:
    polling.wait_for(condition, what, timeout, interval_s=0.005)


def test_drain_and_stop(bundles_dir: Path, reference, device_channel) -> None:
    act = _activation(reference, seed=30)
    srv = CloudServer(bundles_dir, max_wait_ms=60_000)  # a request waits in its batch window until drained
    srv.start()
    try:
        with device_channel(srv.address, "test", OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            def check() -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_S).status

            assert check() == health_pb2.HealthCheckResponse.SERVING
            outbox: queue.Queue = queue.Queue()

            def requests() -> Iterator[pb.InferRequest]:
                while (item := outbox.get(timeout=DEADLINE_S)) is not None:
                    yield item

            call = pb_grpc.SplitInferenceStub(channel).Infer(requests(), timeout=DEADLINE_S)
            outbox.put(_request("inflight", act))
            _poll(lambda: srv.stats.snapshot()["queued"] == 1, "the request to wait in its batch")
            drainer = threading.Thread(target=srv.drain)
            drainer.start()
            first = next(call)  # drained: the in-flight request completes
            assert first.request_id == "inflight"
            np.testing.assert_allclose(_output(first), reference["tail"].run(None, {CUT_TENSOR: act})[0], atol=1e-6)
            drainer.join(DEADLINE_S)
            assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
            outbox.put(_request("late", act))  # new work while draining: refused, the stream still open
            late = next(call)
            assert late.request_id == "late" and late.status.code == UNAVAILABLE
            assert "shutting down" in late.status.message
            srv.stop(grace=5)
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            outbox.put(None)
    finally:
        srv.stop(grace=1)
    assert srv.wait(DEADLINE_S)


def test_split_cloud_process_serves_and_stops_on_sigterm(bundles_dir: Path, device_channel) -> None:
    with CloudProcess(bundles_dir) as proc:
        with device_channel(proc.address) as channel:
            served = pb_grpc.SplitInferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=DEADLINE_S)
            assert {c.cut for c in served.cuts} == {MID_CUT, "cloud-only"}
        assert proc.terminate() == 0


# -- the node as a service: stable ports, port conflicts, systemd ----------------------------------------------


def test_split_cloud_serve_defaults_to_the_stable_ports_on_loopback() -> None:
    from cloud_tier.cli import build_parser

    args = build_parser().parse_args(["serve", "--bundles", "b"])
    assert (args.host, args.port, args.dashboard_host, args.dashboard_port) == ("127.0.0.1", 50051, "127.0.0.1", 8080)
    assert args.broker_port is None and args.broker_host is None  # 8883 with TLS, 1883 with --insecure: see below


def _serve(bundles_dir: Path, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cloud_tier.cli", "serve", "--bundles", str(bundles_dir),
                             "--cpu-only", "--log-level", "WARNING", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=CHECKOUT, env={**child_env(), **(env or {})}, **kw)


@pytest.mark.parametrize("flag", ["--port", "--broker-port", "--dashboard-port"])
def test_a_port_in_use_is_one_clear_error_naming_the_flag(bundles_dir: Path, tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        ports = {"--port": "0", "--broker-port": "0", "--dashboard-port": "0", flag: busy}
        args = [a for kv in ports.items() for a in kv]
        proc = _serve(bundles_dir, *args, "--db", str(tmp_path / "fleet.db"))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("split-cloud:")]
    assert len(lines) == 1 and f"127.0.0.1:{busy}" in lines[0] and flag in lines[0], err
    assert "listening on" not in out


def test_serve_tells_systemd_ready_watchdog_and_stopping(bundles_dir: Path, tmp_path: Path) -> None:
    """Type=notify: READY=1 once serving, WATCHDOG=1 at half of WatchdogSec while serving, STOPPING=1 on SIGTERM."""
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(sock_path))
        notify_sock.settimeout(DEADLINE_S)
        env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}  # ping every 0.2 s
        proc = _serve(bundles_dir, "--port", "0", "--broker-port", "0", "--dashboard-port", "0", "--db",
                      str(tmp_path / "fleet.db"), env=env)
        try:
            seen: list[str] = []

            def until(state: str) -> None:
                while state not in seen:
                    seen.extend(notify_sock.recv(4096).decode().splitlines())

            until("READY=1")
            assert proc.poll() is None
            until("WATCHDOG=1")
            proc.send_signal(signal.SIGTERM)
            until("STOPPING=1")
            assert proc.wait(timeout=DEADLINE_S) == 0
            assert seen.index("READY=1") < seen.index("WATCHDOG=1") < seen.index("STOPPING=1")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=DEADLINE_S)


def test_install_stages_a_hardened_unit_and_the_ca_with_private_modes(bundles_dir: Path, pki, tmp_path: Path) -> None:
    from cloud_tier import cli
    from cloud_tier.install import SERVICE_NAME, STATE_DIR
    from models import systemd

    root = tmp_path / "image"
    if not (pki.dir / "devices" / "install-probe" / "device.key").exists():
        pki.enroll("install-probe", pki.dir / "devices" / "install-probe")  # where split-cloud enroll puts it
    assert cli.main(["install", "--bundles", str(bundles_dir), "--pki", str(pki.dir), "--root", str(root), "--",
                     "--host", "0.0.0.0"]) == 0
    unit_file = root / "etc" / "systemd" / "system" / f"{SERVICE_NAME}.service"
    unit = unit_file.read_text()
    for line in ("Type=notify", "Restart=on-failure", "User=splitinfer-cloud", "ProtectSystem=strict",
                 f"StateDirectory={SERVICE_NAME}", "WatchdogSec=30", f"ReadOnlyPaths={bundles_dir.resolve()}"):
        assert line in unit.splitlines(), line
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert f" serve --bundles {bundles_dir.resolve()} --pki {STATE_DIR}/pki --db {STATE_DIR}/fleet.db --host " \
           "0.0.0.0" in exec_start
    state = root / STATE_DIR.relative_to("/")
    assert _mode(state) == 0o750 and _mode(state / "pki") == 0o700
    for name, mode in (("server.key", 0o600), ("dashboard.token", 0o600), ("ca.pem", 0o640), ("crl.pem", 0o640)):
        assert _mode(state / "pki" / name) == mode, name
        assert (state / "pki" / name).read_bytes() == (pki.dir / name).read_bytes()
    # The CA's signing key and the device folders (their private keys) stay off the serving node.
    assert (pki.dir / "ca.key").is_file() and not (state / "pki" / "ca.key").exists()
    assert not list((state / "pki").rglob("device.key"))
    complaints = systemd.verify_unit(unit, SERVICE_NAME)
    if complaints is not None:  # systemd-analyze is installed here
        assert complaints == "", complaints
    # The node starts from the service's copy (no CA key in it), both planes on, as the unit runs it.
    from cloud_tier.config import NodeOptions, ServerConfig
    from cloud_tier.node import CloudNode

    node = CloudNode(bundles_dir, ServerConfig(port=0, prefer_gpu=False, pki_dir=state / "pki"),
                     NodeOptions(db_path=tmp_path / "fleet.db", dashboard_port=0, embedded_broker_port=0))
    node.start()
    try:
        assert node.controller is not None and node.controller.connected
    finally:
        node.stop(grace=1.0)

    printed = subprocess.run([sys.executable, "-m", "cloud_tier.cli", "install", "--bundles", str(bundles_dir),
                              "--print", "--root", str(tmp_path / "untouched")], capture_output=True, text=True,
                             cwd=CHECKOUT, env=child_env(), timeout=60)
    assert printed.returncode == 0 and printed.stdout.startswith("[Unit]") and "Type=notify" in printed.stdout
    assert not (tmp_path / "untouched").exists()  # --print only prints
    assert cli.main(["install", "--bundles", str(bundles_dir), "--pki", str(tmp_path / "no-ca"), "--root",
                     str(root)]) == 2


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
