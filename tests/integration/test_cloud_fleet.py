"""`split-cloud serve` with the fleet control plane, as a subprocess: printed addresses, MQTT state and telemetry
into /api/fleet, gRPC counters in a strictly parsed /metrics, clean SIGTERM (embedded broker and Mosquitto)."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from cloud_tier.lab.mosquitto import Mosquitto
from cloud_tier.lab.process import CloudProcess
from cloud_tier.metrics import ServerCollector, render
from cloud_tier.pki import CertificateAuthority
from models.tiny_bundle import CUT_SHAPE, CUT_TENSOR, MID_CUT, make_tiny_bundle
from protos import codec
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos.mqtt import STATE, TELEMETRY, DeviceState, MqttTls, TelemetryBatch, TelemetryRecord, device_topic
from tests import polling
from tests.pki import device_channel, device_folder

DEADLINE_S = 10.0
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet-bundles")
    make_tiny_bundle(root / "tiny")
    return root


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
    """Poll `cond` until truthy; fail naming `what` at the deadline."""
    return polling.wait_for(cond, what, timeout_s)


def get(url: str) -> tuple[str, str]:
    """(content type, body) of a GET with a deadline."""
    with urllib.request.urlopen(url, timeout=DEADLINE_S) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# -- a strict Prometheus text-format (0.0.4) parser --------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_VALUE = r"(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|NaN|[-+]Inf)"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_LABEL = rf"[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE}"
HELP_RE = re.compile(rf"^# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)$")
TYPE_RE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
SAMPLE_RE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? ({_VALUE})$")
LABEL_RE = re.compile(rf"([a-zA-Z_][a-zA-Z0-9_]*)=({_LABEL_VALUE})")


def _unescape(quoted: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), quoted[1:-1])


def parse_prometheus(text: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """family name -> {labels -> value}; fails on any malformed line, undeclared or redeclared family."""
    assert text.endswith("\n"), "exposition must end with a newline"
    types: dict[str, str] = {}
    helped: set[str] = set()
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if m := HELP_RE.match(line):
            assert m.group(1) not in helped, f"line {n}: second HELP for {m.group(1)}"
            helped.add(m.group(1))
        elif m := TYPE_RE.match(line):
            assert m.group(1) not in types, f"line {n}: second TYPE for {m.group(1)}"
            assert m.group(1) in helped, f"line {n}: TYPE before HELP for {m.group(1)}"
            types[m.group(1)] = m.group(2)
            out[m.group(1)] = {}
        elif m := SAMPLE_RE.match(line):
            name, labels_text, value = m.groups()
            family = name
            if name not in types:
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                assert types.get(family) == "histogram", f"line {n}: sample {name} of no declared family"
            labels = frozenset((k, _unescape(v)) for k, v in LABEL_RE.findall(labels_text or ""))
            if family != name:
                labels |= {("__sample__", name[len(family) + 1:])}
            assert labels not in out[family], f"line {n}: duplicate sample {line!r}"
            out[family][labels] = float(value)
        else:
            raise AssertionError(f"line {n} is not valid Prometheus text format: {line!r}")
    return out


def sample(metrics: dict[str, Any], family: str, **labels: str) -> float | None:
    """The value of one sample, or None."""
    return metrics.get(family, {}).get(frozenset(labels.items()))


def test_exposition_escapes_hostile_label_values() -> None:
    text = render(ServerCollector(lambda: {"errors": {}}, lambda: {('m"x\\', "c\n1", "OK"): 2}))
    parsed = parse_prometheus(text)
    assert sample(parsed, "splitinfer_cloud_responses_total", model='m"x\\', cut="c\n1", code="OK") == 2


# -- helpers talking to the node -------------------------------------------------------------------------


def node_device_tls(tmp_path: Path, device_id: str) -> MqttTls:
    """`device_id`'s certificate from the session CA, which the node serves both planes with (STATE/pki)."""
    folder = device_folder(device_id)
    return MqttTls(str(folder / "ca.pem"), str(folder / "device.pem"), str(folder / "device.key"))


def plaintext_refused(host: str, port: int) -> bool:
    """Whether the broker refuses an anonymous plaintext client (it never gets a CONNACK that admits it)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="anon", protocol=mqtt.MQTTv311,
                         reconnect_on_failure=False)
    answered, admitted = threading.Event(), []
    client.on_connect = lambda _c, _u, _f, rc, _p: (admitted.append(not rc.is_failure), answered.set())
    client.on_disconnect = lambda *_: answered.set()
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        assert answered.wait(DEADLINE_S), "the broker neither admitted nor refused a plaintext client"
        return admitted != [True]
    finally:
        client.disconnect()
        client.loop_stop()


def publish_device(host: str, port: int, device_id: str, n_records: int, tls: MqttTls | None) -> None:
    """Publish a retained online state and one telemetry batch of `n_records` for `device_id` (QoS 1)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=device_id if tls else f"test-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
    if tls is not None:
        tls.apply(client)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        now = time.time()
        state = DeviceState(status="online", mode="split", cut=MID_CUT, bandwidth_mbps=18.9, model="tiny",
                            label="bench <b>1</b>")
        records = tuple(
            TelemetryRecord(request_id=f"r{i}", ts=now - 0.01 * i, head_ms=1.0, encode_ms=0.2, network_ms=3.0 + i,
                            queue_ms=0.5, tail_ms=2.0, total_ms=6.7 + i, served_by="cloud", cut=MID_CUT)
            for i in range(n_records)
        )
        infos = [client.publish(device_topic(device_id, STATE), state.to_json(), qos=1, retain=True),
                 client.publish(device_topic(device_id, TELEMETRY), TelemetryBatch(records, dropped=2).to_json(),
                                qos=1)]
        for info in infos:
            info.wait_for_publish(timeout=DEADLINE_S)
            assert info.is_published(), f"broker {host}:{port} did not acknowledge a QoS 1 publish"
    finally:
        client.disconnect()
        client.loop_stop()


def send_requests(address: str, device_id: str, n_ok: int, insecure: bool = False) -> list[int]:
    """Send `n_ok` valid Infer requests and one for an unknown cut on one stream; return the status codes."""
    array = np.random.default_rng(0).standard_normal((1, *CUT_SHAPE[1:])).astype(np.float32)
    requests = [pb.InferRequest(request_id=f"q{i}", device_id=device_id, model="tiny", cut=MID_CUT,
                                tensors=[codec.encode(CUT_TENSOR, array, "fp32")]) for i in range(n_ok)]
    requests.append(pb.InferRequest(request_id="bad", device_id=device_id, model="tiny", cut="no-such-cut",
                                    tensors=[codec.encode(CUT_TENSOR, array, "fp32")]))
    channel = (grpc.insecure_channel(address, options=OPTIONS) if insecure
               else device_channel(address, device_id, OPTIONS))  # mTLS as that device (tests/pki.py)
    with channel:
        stub = pb_grpc.SplitInferenceStub(channel)
        return sorted(r.status.code for r in stub.Infer(iter(requests), timeout=DEADLINE_S))


def fleet_device(dashboard_url: str, device_id: str, min_count: int) -> dict[str, Any] | None:
    """The /api/fleet row of `device_id` once it has at least `min_count` records, else None."""
    _, body = get(dashboard_url + "api/fleet")
    rows = {d["device"]: d for d in json.loads(body)["devices"]}
    row = rows.get(device_id)
    return row if row is not None and row["count"] >= min_count else None


def start_node(bundles_dir: Path, tmp_path: Path, *args: str) -> CloudProcess:
    proc = CloudProcess(bundles_dir, "--db", str(tmp_path / "fleet.db"), "--cpu-only", "--log-level", "WARNING",
                        "--grace", "5", *args, start_timeout=30.0)
    proc.start()
    return proc


def check_node(proc: CloudProcess, device_id: str, tls: MqttTls | None) -> None:
    """MQTT state + telemetry reach /api/fleet; Infer requests show in /metrics and in the fleet row (tls None:
    the node runs --insecure, both planes plaintext)."""
    assert proc.port and proc.broker_port and proc.dashboard_url
    assert proc.dashboard_url.startswith("http://127.0.0.1:")
    publish_device(proc.broker_host, proc.broker_port, device_id, 5, tls)
    row = wait_for(lambda: fleet_device(proc.dashboard_url, device_id, 5), f"{device_id} in /api/fleet")
    assert (row["status"], row["mode"], row["cut"], row["model"]) == ("online", "split", MID_CUT, "tiny")
    assert row["label"] == "bench <b>1</b>" and row["dropped_total"] == 2

    codes = send_requests(proc.address, device_id, n_ok=4, insecure=tls is None)
    assert codes == [0, 0, 0, 0, grpc.StatusCode.NOT_FOUND.value[0]]

    content_type, text = get(proc.dashboard_url + "metrics")
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    m = parse_prometheus(text)
    assert sample(m, "splitinfer_cloud_responses_total", model="tiny", cut=MID_CUT, code="OK") == 4
    assert sample(m, "splitinfer_cloud_responses_total", model="_unknown", cut="_unknown", code="NOT_FOUND") == 1
    assert sample(m, "splitinfer_cloud_errors_total", code="NOT_FOUND") == 1
    assert sample(m, "splitinfer_cloud_requests_total") == 5
    batches = sample(m, "splitinfer_cloud_batches_total")
    assert batches is not None and 1 <= batches <= 4
    hist = m["splitinfer_cloud_batch_size_rows"]
    assert hist[frozenset({("__sample__", "count")})] == batches
    assert hist[frozenset({("__sample__", "sum")})] == 4  # one row per request
    assert hist[frozenset({("__sample__", "bucket"), ("le", "+Inf")})] == batches
    assert sample(m, "splitinfer_cloud_queue_depth") == 0 and sample(m, "splitinfer_cloud_in_flight") == 0
    assert sample(m, "splitinfer_device_up", device=device_id) == 1
    assert sample(m, "splitinfer_device_dropped_records_total", device=device_id) == 2
    p95 = sample(m, "splitinfer_device_latency_ms", device=device_id, stage="total", quantile="0.95")
    assert p95 is not None and math.isfinite(p95)
    assert sample(m, "splitinfer_fleet_mqtt_connected") == 1
    assert sample(m, "splitinfer_fleet_stored_records_total") == 5
    assert sample(m, "splitinfer_fleet_future_timestamps_total") == 0

    row = fleet_device(proc.dashboard_url, device_id, 5)
    assert row is not None and row["cloud"]["requests"] == 5 and row["cloud"]["errors"] == 1


def stop_node(proc: CloudProcess) -> None:
    """SIGTERM: exit 0, gRPC and dashboard ports closed."""
    assert proc.terminate(timeout=DEADLINE_S) == 0
    assert not listening("127.0.0.1", proc.port)
    assert proc.dashboard_url is not None
    dash_port = int(proc.dashboard_url.rstrip("/").rsplit(":", 1)[1])
    assert not listening("127.0.0.1", dash_port)


# -- the tests ---------------------------------------------------------------------------------------------


def test_serve_with_embedded_broker(bundles_dir: Path, tmp_path: Path) -> None:
    proc = start_node(bundles_dir, tmp_path)
    try:
        assert proc.broker_embedded is True and proc.broker_host == "127.0.0.1"
        assert plaintext_refused(proc.broker_host, proc.broker_port), "the default embedded broker took plaintext"
        check_node(proc, "cam-embedded", node_device_tls(tmp_path, "cam-embedded"))
        assert json.loads(get(proc.dashboard_url + "api/fleet")[1])["warnings"] == []
        stop_node(proc)
        assert not listening(proc.broker_host, proc.broker_port), "the embedded broker outlived split-cloud"
    finally:
        proc.kill()


def test_serve_with_embedded_broker_in_insecure_mode(bundles_dir: Path, tmp_path: Path) -> None:
    proc = start_node(bundles_dir, tmp_path, "--insecure")
    try:
        assert proc.broker_embedded is True
        check_node(proc, "cam-insecure", None)
        _, body = get(proc.dashboard_url + "api/fleet")
        assert [w.split(":")[0] for w in json.loads(body)["warnings"]] == ["WARNING", "WARNING"]  # gRPC and MQTT
        assert "--insecure" in json.loads(body)["warnings"][0]
        stop_node(proc)
    finally:
        proc.kill()


def test_serve_with_mosquitto(bundles_dir: Path, tmp_path: Path, mosquitto_tls: Mosquitto,  # noqa: F811
                              pki: CertificateAuthority, mqtt_tls: Callable[[str], MqttTls]) -> None:
    mosquitto = mosquitto_tls
    proc = start_node(bundles_dir, tmp_path, "--broker", f"{mosquitto.host}:{mosquitto.port}",
                      "--pki", str(pki.dir))
    try:
        assert proc.broker_embedded is False and proc.broker_address == f"{mosquitto.host}:{mosquitto.port}"
        assert plaintext_refused(mosquitto.host, mosquitto.port), "the generated Mosquitto config took plaintext"
        check_node(proc, "cam-mosquitto", mqtt_tls("cam-mosquitto"))
        stop_node(proc)
        assert listening(mosquitto.host, mosquitto.port), "an external broker must be left running"
    finally:
        proc.kill()


def test_fleet_history_survives_a_restart(bundles_dir: Path, tmp_path: Path) -> None:
    """The SQLite store is a file: a restarted node (new embedded broker) still lists the device."""
    proc = start_node(bundles_dir, tmp_path)
    try:
        publish_device(proc.broker_host, proc.broker_port, "cam-persist", 3, node_device_tls(tmp_path, "cam-persist"))
        wait_for(lambda: fleet_device(proc.dashboard_url, "cam-persist", 3), "cam-persist in /api/fleet")
        assert proc.terminate(timeout=DEADLINE_S) == 0
    finally:
        proc.kill()
    again = start_node(bundles_dir, tmp_path)
    try:
        assert fleet_device(again.dashboard_url, "cam-persist", 3) is not None
        assert again.terminate(timeout=DEADLINE_S) == 0
    finally:
        again.kill()


def test_no_fleet_runs_only_grpc(bundles_dir: Path, tmp_path: Path) -> None:
    proc = start_node(bundles_dir, tmp_path, "--no-fleet")
    try:
        assert proc.broker_address is None and proc.dashboard_url is None
        assert send_requests(proc.address, "cam-grpc", n_ok=1)[0] == 0
        assert proc.terminate(timeout=DEADLINE_S) == 0
        assert not (tmp_path / "fleet.db").exists()
    finally:
        proc.kill()


@pytest.mark.parametrize("args,expected", [
    (("--broker", "nohost"), "--broker 'nohost' is invalid: expected HOST:PORT"),
    (("--db", ":memory:"), "--db ':memory:' is not supported"),
])
def test_bad_fleet_options_exit_2(bundles_dir: Path, tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    proc = CloudProcess(bundles_dir, "--cpu-only", *args, start_timeout=30.0)
    with pytest.raises(RuntimeError, match="exited with 2") as err:
        proc.start()
    assert expected in str(err.value)
