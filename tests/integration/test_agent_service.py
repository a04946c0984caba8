"""`split-agent serve` as a real process: an application calls it over its Unix socket (results served by a real
cloud over mTLS, and by the device when the cloud is absent), bad inputs get INVALID_ARGUMENT naming the spec,
SIGTERM during a stream drains (every accepted request answered, telemetry flushed, offline published, exit 0),
systemd's notify socket gets READY=1 / WATCHDOG=1 / STOPPING=1, and SIGHUP applies a changed key."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from cloud_tier.server import CloudServer
from edge_agent.local_client import LocalClient, LocalError
from models.manifest import Bundle
from models.tiny_bundle import INPUT_SHAPE, make_tiny_bundle, sample_input
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos import local_pb2 as lpb
from protos import local_pb2_grpc as lpb_grpc
from tests.integration.test_agent_interrupt import _split_agent  # `split-agent run` with no cloud, as edge-0
from tests.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
START_S = 60.0  # loading the head and onnxruntime on a busy 2-core host
SPLIT_ATOL = 0.03  # as tests/integration/test_agent_split.py: int8 head + int8 codec against full.onnx
SHAPE1 = (1, *INPUT_SHAPE[1:])  # one sample
SPEC = f"input float32 [N, {', '.join(map(str, INPUT_SHAPE[1:]))}]"  # as the service names the model's input


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("svc_bundles")
    make_tiny_bundle(root / "tiny")
    return root


@pytest.fixture(scope="module")
def cloud(bundles_dir: Path) -> Iterator[CloudServer]:
    srv = CloudServer(bundles_dir, "127.0.0.1", 0, max_wait_ms=2.0)  # mTLS with the session CA
    srv.start()
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture()
def sockdir() -> Iterator[Path]:
    """A short folder for the socket (sun_path holds 107 bytes; pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="sa-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(folder: Path, bundle: Path, tls: Any, cloud: str, socket_path: Path, extra: str = "",
                 device_id: str = "svc-0") -> Path:
    cfg = folder / "agent.toml"
    cfg.write_text(
        f'bundle = "{bundle}"\ncloud = "{cloud}"\ndevice_id = "{device_id}"\nconnect_timeout_s = 1.0\n'
        f'probe_count = 1\ndeadline_ms = 5000\n{extra}\n'
        f'[backoff]\ninitial_s = 0.05\nmax_s = 0.3\n'
        f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
        f'[service]\nsocket = "{socket_path}"\nlog_level = "INFO"\ndrain_timeout_s = 30.0\n'
    )
    return cfg


class Serve:
    """`split-agent serve --config CFG` in a subprocess; its stderr collected by a thread."""

    def __init__(self, config: Path, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "serve", "--config", str(config)], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_serving(self) -> None:
        wait_for(lambda: self.proc.poll() is not None or "split-agent: serving" in self.log,
                 "split-agent serve listening", START_S)
        assert self.proc.poll() is None, self.log

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._reader.join(5.0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5.0)


@pytest.fixture()
def serve() -> Iterator[Any]:
    started: list[Serve] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Serve:
        s = Serve(config, env)
        started.append(s)
        s.wait_serving()
        return s

    yield start
    for s in started:
        s.kill()


def test_an_application_gets_results_from_the_cloud_and_bad_inputs_name_the_spec(
        bundles_dir, cloud, device_tls, sockdir, serve, tmp_path):
    sock = sockdir / "agent.sock"
    svc = serve(write_config(tmp_path, bundles_dir / "tiny", device_tls("svc-0"), cloud.address, sock))
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    full = ort.InferenceSession(str(Bundle.load(bundles_dir / "tiny").full))
    with LocalClient(socket=str(sock)) as client:
        wait_for(lambda: client.health()["mode"] == "split", "the service in split mode", START_S)
        h = client.health()
        assert h["cloud_connected"] and h["cut"] == "c1" and h["model"] == "tiny" and not h["draining"]
        x = sample_input(1)
        r = client.infer(x, timeout=10.0)
        assert r.served_by == "cloud" and r.cut == "c1", r
        np.testing.assert_allclose(r.output, full.run(None, {"input": x})[0], atol=SPLIT_ATOL)
        assert r.timing["total_ms"] > 0 and r.timing["head_ms"] > 0
        batch = sample_input(3, seed=1)
        answers = list(client.stream([batch[i:i + 1] for i in range(3)], timeout=30.0))
        assert sorted(a.request_id for a in answers) == ["1", "2", "3"]  # type: ignore[union-attr]
        for a in answers:
            i = int(a.request_id) - 1  # type: ignore[union-attr]
            np.testing.assert_allclose(a.output, full.run(None, {"input": batch[i:i + 1]})[0],  # type: ignore[union-attr]
                                       atol=SPLIT_ATOL)

        bad_inputs = {
            "shape": {"input": np.zeros((1, 3, 8, 8), np.float32)},
            "dtype": {"input": np.zeros(SHAPE1, np.int64)},
            "unknown name": {"input": x, "extra": x},
            "missing input": {"other": x},
        }
        for what, feeds in bad_inputs.items():
            with pytest.raises(LocalError) as err:
                client.infer(feeds, timeout=10.0)
            assert err.value.code == "INVALID_ARGUMENT", (what, err.value)
            assert f"the model expects: {SPEC}" in err.value.message, (what, err.value)
    # A tensor whose declared size does not match its data: refused from the metadata, before any allocation.
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        stub = lpb_grpc.LocalInferenceStub(ch)
        lie = pb.Tensor(name="input", dtype=pb.FLOAT32, shape=list(SHAPE1), data=b"\0" * 16, raw_size=16)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Infer(lpb.LocalInferRequest(inputs=[lie]), timeout=10.0)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        huge = pb.Tensor(name="input", dtype=pb.FLOAT32, shape=[1 << 20, *INPUT_SHAPE[1:]],
                         raw_size=(1 << 20) * int(np.prod(INPUT_SHAPE[1:])) * 4)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Infer(lpb.LocalInferRequest(inputs=[huge]), timeout=10.0)
        assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, rpc.value.details()
    assert svc.stop() == 0, svc.log
    assert not sock.exists()  # removed on the way out


def _stream_inputs(n: int, sent: list[int], gate: threading.Event) -> Iterator[np.ndarray]:
    x = sample_input(1)
    for i in range(n):
        if i == 20:
            gate.set()  # the test sends SIGTERM now, with requests in flight and more coming
        sent.append(i)
        yield x
        time.sleep(0.002)  # pacing the application's feed (not a wait for a condition)


def test_sigterm_during_a_stream_answers_every_accepted_request_flushes_telemetry_and_goes_offline(
        bundles_dir, device_tls, sockdir, serve, tmp_path, fleet, mosquitto):
    store, _ctl = fleet
    sock = sockdir / "agent.sock"
    mqtt = f'[mqtt]\nbroker = "{mosquitto.host}:{mosquitto.port}"\ninsecure = true\nflush_interval_ms = 50\n'
    cfg = write_config(tmp_path, bundles_dir / "tiny", device_tls("svc-1"), "127.0.0.1:1", sock, device_id="svc-1")
    cfg.write_text(cfg.read_text() + mqtt)
    svc = serve(cfg)
    wait_for(lambda: (d := store.device("svc-1")) and d["status"] == "online", "svc-1 online on MQTT", START_S)
    ok: list[Any] = []
    refused: list[LocalError] = []
    sent: list[int] = []
    gate = threading.Event()

    def app() -> None:
        with LocalClient(socket=str(sock)) as client:
            for a in client.stream(_stream_inputs(100_000, sent, gate), timeout=60.0, raise_errors=False):
                (refused if isinstance(a, LocalError) else ok).append(a)

    t = threading.Thread(target=app)
    t.start()
    assert gate.wait(START_S)
    assert svc.stop(signal.SIGTERM) == 0, svc.log
    t.join(30.0)
    assert not t.is_alive()
    m = re.search(r"drained \(SIGTERM\): (\d+) requests answered", svc.log)
    assert m, svc.log
    answered = int(m.group(1))
    assert answered >= 20 and len(ok) == answered, (answered, len(ok), svc.log[-2000:])
    assert all(a.served_by == "edge" for a in ok)
    assert all(e.code == "UNAVAILABLE" and "draining" in e.message for e in refused), refused[:3]
    assert "Traceback" not in svc.log
    wait_for(lambda: store.device("svc-1")["status"] == "offline", "svc-1 offline after the drain")
    wait_for(lambda: store.record_count("svc-1") == answered, f"{answered} telemetry records of svc-1 stored")


def _notifications(sock: socket.socket, until: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            break
        if until in got:
            return got
    raise AssertionError(f"no {until} within {timeout} s; got {got}")


def test_systemd_notify_watchdog_and_sighup_reload(bundles_dir, device_tls, sockdir, serve, tmp_path):
    notify_path = sockdir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        sock = sockdir / "agent.sock"
        cfg = write_config(tmp_path, bundles_dir / "tiny", device_tls("svc-2"), "127.0.0.1:1", sock,
                           device_id="svc-2")
        svc = serve(cfg, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"})
        got = _notifications(notify, "READY=1", START_S)
        assert any(s.startswith("STATUS=mode local, cut c1") for s in got), got
        got = _notifications(notify, "WATCHDOG=1", 10.0)
        got = _notifications(notify, "WATCHDOG=1", 10.0)  # again: it keeps pinging while healthy
        with LocalClient(socket=str(sock)) as client:
            assert client.health()["cut"] == "c1"
            # SIGHUP with a changed run-time key (cut) and one that needs a restart (cloud): the first applies.
            cfg.write_text(cfg.read_text().replace('probe_count = 1\n', 'probe_count = 1\ncut = "edge-only"\n')
                           .replace('cloud = "127.0.0.1:1"', 'cloud = "127.0.0.1:2"'))
            svc.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: client.health()["cut"] == "edge-only", "cut edge-only after SIGHUP")
            wait_for(lambda: "needs a restart, not applied: cloud" in svc.log, "the restart-only key named")
            assert client.infer(sample_input(1), timeout=10.0).cut == "edge-only"
            # A bad config is refused and the running one kept.
            cfg.write_text(cfg.read_text().replace('cut = "edge-only"', 'cut = 7'))
            svc.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload refused" in svc.log, "the bad config refused")
            assert client.health()["cut"] == "edge-only"
        svc.proc.send_signal(signal.SIGTERM)
        got = _notifications(notify, "STOPPING=1", 30.0)
        assert svc.stop() == 0, svc.log


def test_serve_refuses_a_symlink_or_a_live_socket_at_its_path(bundles_dir, device_tls, sockdir, tmp_path):
    sock = sockdir / "agent.sock"
    target = tmp_path / "elsewhere"
    target.write_text("not yours")
    sock.symlink_to(target)
    cfg = write_config(tmp_path, bundles_dir / "tiny", device_tls("svc-3"), "127.0.0.1:1", sock, device_id="svc-3")
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=START_S)
    assert done.returncode == 2 and "is a symlink; refusing to follow it" in done.stderr, done.stderr
    assert target.read_text() == "not yours"
    sock.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(sock))
        live.listen(1)
        done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=START_S)
    assert done.returncode == 2 and "another process is listening" in done.stderr, done.stderr


def test_split_agent_infer_prints_the_result(bundles_dir, device_tls, sockdir, serve, tmp_path):
    sock = sockdir / "agent.sock"
    svc = serve(write_config(tmp_path, bundles_dir / "tiny", device_tls("svc-4"), "127.0.0.1:1", sock,
                             device_id="svc-4"))
    np.save(tmp_path / "x.npy", sample_input(1))
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "infer", str(tmp_path / "x.npy"), "--socket",
                           str(sock), "--json", "--out", str(tmp_path / "y.npz")], cwd=ROOT, capture_output=True,
                          text=True, timeout=START_S)
    assert done.returncode == 0, done.stderr
    assert '"served_by": "edge"' in done.stdout and '"shape": [\n        1,\n        10\n      ]' in done.stdout
    assert np.load(tmp_path / "y.npz")["output"].shape == (1, 10)
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 8, 8), np.float32))
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "infer", str(tmp_path / "bad.npy"), "--socket",
                           str(sock)], cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr and SPEC in done.stderr
    assert svc.stop() == 0, svc.log


def test_split_agent_run_drains_on_sigterm_and_exits_0_after_its_summary(bundles_dir, device_tls):
    proc = _split_agent(bundles_dir / "tiny", device_tls("svc-5"), "svc-5", "--rate", "50", "--count", "1000000")
    try:
        first = proc.stderr.readline()  # type: ignore[union-attr]  # the feed is starting
        assert first.startswith("split-agent:"), first
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    m = re.search(r"interrupted after (\d+) of 1000000 requests", err)
    assert m and f"requests {m.group(1)} " in out and "failed 0" in out, (out, err)


def test_the_client_imports_without_onnxruntime():
    """An application's environment needs grpcio, numpy and the protos only."""
    block = ("import importlib.abc, sys\n"
             "class B(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path, target=None):\n"
             "        if name.split('.')[0] in ('onnxruntime', 'onnx', 'torch', 'paho'):\n"
             "            raise ImportError(name + ' is blocked')\n"
             "sys.meta_path.insert(0, B())\n"
             "from edge_agent.local_client import LocalClient, LocalError\n"
             "assert 'onnxruntime' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_serve_on_loopback_tcp(bundles_dir, device_tls, sockdir, serve, tmp_path):
    cfg = write_config(tmp_path, bundles_dir / "tiny", device_tls("svc-6"), "127.0.0.1:1", sockdir / "unused.sock",
                       device_id="svc-6")
    cfg.write_text(cfg.read_text() + 'listen = "127.0.0.1:0"\n')  # appended to [service]
    svc = serve(cfg)
    m = re.search(r"serving tiny cut c1 on (127\.0\.0\.1:\d+)", svc.log)
    assert m, svc.log
    assert not (sockdir / "unused.sock").exists()
    with LocalClient(address=m.group(1)) as client:
        r = client.infer(sample_input(2), timeout=10.0)  # a batch of two
        assert r.output.shape == (2, 10) and r.served_by == "edge"
        assert client.health()["input_specs"] == [SPEC]
    assert svc.stop(signal.SIGINT) == 0, svc.log  # SIGINT drains as SIGTERM does


class _SilentCloud(pb_grpc.SplitInferenceServicer):
    """A cloud that is healthy and answers the agent's probes, but never a request (a hung tail)."""

    def Infer(self, request_iterator, context):  # noqa: N802
        for req in request_iterator:
            if req.probe:
                yield pb.InferResponse(request_id=req.request_id, status=pb.RequestStatus(code=0))


def test_a_drain_that_times_out_exits_1_naming_what_was_left(bundles_dir, sockdir, tmp_path, capsys):
    from grpc_health.v1 import health, health_pb2_grpc

    from edge_agent.service import AgentService

    silent = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_SplitInferenceServicer_to_server(_SilentCloud(), silent)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), silent)  # "" and any service: SERVING
    port = silent.add_insecure_port("127.0.0.1:0")
    silent.start()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'bundle = "{bundles_dir / "tiny"}"\ncloud = "127.0.0.1:{port}"\ninsecure = true\n'
                   f'health_service = ""\ndeadline_ms = 60000\nprobe_count = 1\n'
                   f'[service]\nsocket = "{sockdir / "agent.sock"}"\ndrain_timeout_s = 0.5\n')
    service = AgentService(cfg).start()
    try:
        wait_for(lambda: service.agent.mode == "split", "split mode with the silent cloud", START_S)
        errors: list[LocalError] = []

        def call() -> None:
            with LocalClient(socket=str(sockdir / "agent.sock")) as client:
                try:
                    client.infer(sample_input(1), timeout=30.0)
                except LocalError as exc:
                    errors.append(exc)

        t = threading.Thread(target=call)
        t.start()
        wait_for(lambda: service.api is not None and service.api.in_flight == 1, "one request in flight")
        assert service.drain("test") == 1
        t.join(30.0)
    finally:
        silent.stop(None)
    assert "drain timed out after 0.5 s: 1 local requests unfinished" in capsys.readouterr().err
    assert service.api is not None and service.api.in_flight == 0  # the agent finished it on the device at close


# -- the client's fast path: the shared stream, the one-copy request, deadlines, reconnection ------------------


@pytest.fixture()
def local_api(bundles_dir: Path, sockdir: Path) -> Iterator[Any]:
    """The service's LocalApi over an in-process agent (tiny, no cloud: every request runs on the device)."""
    from edge_agent import EdgeAgent
    from edge_agent.config import ServiceConfig
    from edge_agent.local_api import LocalApi

    agent = EdgeAgent.from_bundle(bundles_dir / "tiny", "127.0.0.1:1", connect=False, insecure=True,
                                  device_id="fast", max_in_flight=4)
    agent.set_mode("local")
    apis: list[LocalApi] = []

    def start() -> LocalApi:
        apis.append(LocalApi(agent, ServiceConfig(socket=str(sockdir / "agent.sock"))).start())
        return apis[-1]

    start()
    yield agent, apis, start
    for api in apis:
        api.stop(grace=0.5)
    agent.close()


def test_request_bytes_parses_to_the_codec_s_message():
    from edge_agent.local_client import request_bytes
    from protos import codec

    x = np.random.default_rng(1).standard_normal(SHAPE1).astype(np.float32)
    arrays = {"input": x, "f64": x.astype(np.float64), "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
              "scalar": np.float32(2.5), "empty": np.zeros((0, 3), np.float32),
              "strided": x[:, :, ::2]}  # not C-contiguous: copied once into the message
    got = lpb.LocalInferRequest.FromString(request_bytes(arrays, "r7", 1500))
    want = lpb.LocalInferRequest(request_id="r7", timeout_ms=1500,
                                 inputs=[codec.encode(k, np.ascontiguousarray(v)) for k, v in arrays.items()])
    assert got == want
    np.testing.assert_array_equal(codec.decode(got.inputs[0]), x)
    y = x + 1  # the same name, dtype and shape: the cached header, the new data
    assert lpb.LocalInferRequest.FromString(request_bytes({"input": y})).inputs[0] == codec.encode("input", y)
    with pytest.raises(codec.TensorError, match="dtype"):
        request_bytes({"s": np.array(["a"])})


def test_the_shared_stream_answers_threads_right_and_unary_agrees(local_api, sockdir):
    agent, apis, _ = local_api
    inputs = [np.random.default_rng(i).standard_normal(SHAPE1).astype(np.float32) for i in range(8)]
    want = [agent.infer(x, timeout=30).output for x in inputs]
    with LocalClient(socket=str(sockdir / "agent.sock")) as client:

        def work(k: int) -> list[int]:
            wrong = []
            for j in range(20):
                i = (k + j) % len(inputs)
                while True:  # 6 callers, 4 slots (max_in_flight): RESOURCE_EXHAUSTED is a right answer; retry
                    try:
                        r = client.infer(inputs[i], timeout=30, request_id=f"t{k}-{j}")
                        break
                    except LocalError as exc:
                        if exc.code != "RESOURCE_EXHAUSTED":
                            raise
                        time.sleep(0.002)
                if r.request_id != f"t{k}-{j}" or not np.allclose(r.output, want[i], atol=1e-5):
                    wrong.append(i)
            return wrong

        with ThreadPoolExecutor(6) as pool:
            assert [w for ws in pool.map(work, range(6)) for w in ws] == []
        streams = list(client._streams)
        assert 1 <= len(streams) <= 6 and all(s.users == 0 and s.broken is None for s in streams)
        r = client.infer(inputs[3], timeout=30, unary=True)
        np.testing.assert_allclose(r.output, want[3], atol=1e-5)
        client.infer(inputs[3], timeout=30)
        assert client._streams == streams  # kept open and reused, none added by a caller alone
        with pytest.raises(LocalError, match="INVALID_ARGUMENT") as exc:
            client.infer(np.zeros((1, 5), np.float32), timeout=30)
        assert SPEC in exc.value.message
    assert apis[0].answered == 6 * 20 + 2 and apis[0].in_flight == 0


def test_a_broken_stream_fails_its_requests_and_the_next_infer_reconnects(local_api, sockdir):
    agent, apis, start = local_api
    x = sample_input(1)
    with LocalClient(socket=str(sockdir / "agent.sock")) as client:
        first = client.infer(x, timeout=30).output
        [old] = client._streams
        apis[0].stop(grace=0.5)  # the service restarts on the same socket
        wait_for(lambda: old.broken is not None, "the client sees its stream end", 10.0)
        with pytest.raises(LocalError, match="UNAVAILABLE"):
            client.infer(x, timeout=5)  # nobody listens: refused at once, not after the deadline
        start()
        got: list[np.ndarray] = []

        def answered() -> bool:  # UNAVAILABLE until gRPC's reconnect backoff lets the channel try again
            try:
                got.append(client.infer(x, timeout=30).output)
            except LocalError as exc:
                assert exc.code == "UNAVAILABLE", exc
                return False
            return True

        wait_for(answered, "the same client answered again after the restart", 20.0)
        np.testing.assert_allclose(got[0], first, atol=1e-6)
        [new] = client._streams
        assert new is not old and new.broken is None
    with pytest.raises(LocalError, match="closed"):
        client.infer(x, timeout=30)


def test_deadlines_hold_on_the_stream_for_the_caller_and_on_the_service(local_api, sockdir, monkeypatch):
    from concurrent.futures import Future

    agent, apis, _ = local_api
    hung: list[Future] = []

    def never(inputs, block=True, timeout=None):  # the agent takes the request and never finishes it
        hung.append(Future())
        return hung[-1]

    monkeypatch.setattr(agent, "start_here", never)
    monkeypatch.setattr(agent, "submit", never)
    x = sample_input(1)
    with LocalClient(socket=str(sockdir / "agent.sock"), input_name="input") as client:
        t0 = time.monotonic()
        with pytest.raises(LocalError, match="DEADLINE_EXCEEDED"):
            client.infer(x, timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 5.0
        with pytest.raises(LocalError, match="DEADLINE_EXCEEDED"):
            client.infer(x, timeout=0.3, unary=True)
    # the service keeps a stream request's own timeout_ms (not only the caller's wait): it answers in time
    channel = grpc.insecure_channel(f"unix:{sockdir / 'agent.sock'}")
    try:
        from edge_agent.local_client import SERIAL_METADATA, request_bytes

        call = channel.stream_stream("/splitinfer.local.v1.LocalInference/InferStream",
                                     response_deserializer=lpb.LocalInferResponse.FromString)
        late = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        for metadata in [(), ((SERIAL_METADATA, "1"),)]:  # pipelined, and one at a time as infer's streams
            t0 = time.monotonic()
            answers = list(call(iter([request_bytes({"input": x}, "late", 200)]), timeout=20, metadata=metadata))
            assert [(a.request_id, a.status.code) for a in answers] == [("late", late)]
            assert time.monotonic() - t0 < 10.0
    finally:
        channel.close()
    for fut in hung:  # the agent "finishes" them: their slots are freed
        fut.set_result(None)  # type: ignore[arg-type]
    wait_for(lambda: apis[0].in_flight == 0, "every slot freed")


def test_inputs_the_client_cannot_send_do_not_use_up_the_stream(local_api, sockdir, monkeypatch):
    from edge_agent import local_client

    monkeypatch.setattr(local_client, "STREAM_WINDOW", 2)  # the window, small: 2 leaked slots would block it
    x = np.random.default_rng(0).standard_normal(SHAPE1).astype(np.float32)
    with LocalClient(socket=str(sockdir / "agent.sock")) as client:
        client.infer(x, timeout=30)  # the stream opens
        for _ in range(5):
            with pytest.raises(LocalError) as exc:
                client.infer(np.array(["not", "a", "tensor"]), timeout=2)
            assert exc.value.code == "INVALID_ARGUMENT" and "dtype" in exc.value.message
        assert client.infer(x, timeout=5).output.shape[0] == 1  # not DEADLINE_EXCEEDED behind leaked slots
