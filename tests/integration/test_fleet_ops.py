"""Operating a fleet: a corrupt fleet.db leaves inference serving (the fleet plane degraded, said in /healthz, the
dashboard's banner and the node's banner); `split-cloud fleet ls / send` and the dashboard's command API against
a real node (gRPC mTLS, embedded broker with certificates) and a real agent; /healthz per component."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_tier import cli, fleet_cli
from cloud_tier.config import NodeOptions, ServerConfig, default_pki_dir
from cloud_tier.node import CloudNode
from edge_agent import SPLIT, EdgeAgent
from edge_agent.control import ControlLink
from models.manifest import CLOUD_ONLY
from models.tiny_bundle import CUT_SHAPE, CUT_TENSOR, MID_CUT, make_tiny_bundle, sample_input
from protos import codec
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests import polling
from tests.pki import device_channel, device_tls

DEADLINE_S = 15.0


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ops-bundles")
    make_tiny_bundle(root / "tiny")
    return root


def start_node(bundles: Path, db: Path, **options: Any) -> CloudNode:
    """A node on ports the OS picks, mTLS on both planes with the session CA."""
    node = CloudNode(bundles, ServerConfig(port=0, prefer_gpu=False),
                     NodeOptions(db_path=db, dashboard_port=0, embedded_broker_port=0, **options))
    return node.start()


def http(url: str, *, body: Any = None, headers: dict[str, str] | None = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    """(status, parsed JSON body) of a GET, or a POST when `body` is given."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={**(headers or {}),
                                                          **({"Content-Type": content_type} if data else {})})
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE_S + 5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def infer_ok(address: str, device_id: str) -> bool:
    array = np.random.default_rng(0).standard_normal((1, *CUT_SHAPE[1:])).astype(np.float32)
    req = pb.InferRequest(request_id="r1", device_id=device_id, model="tiny", cut=MID_CUT,
                          tensors=[codec.encode(CUT_TENSOR, array, "fp32")])
    with device_channel(address, device_id) as channel:
        replies = list(pb_grpc.SplitInferenceStub(channel).Infer(iter([req]), timeout=DEADLINE_S))
    return [r.status.code for r in replies] == [0]


def test_a_corrupt_fleet_db_leaves_inference_serving_and_the_fleet_plane_degraded(
        bundles: Path, tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    db.write_bytes(bytes(range(256)) * 64)  # garbage, not SQLite
    node = start_node(bundles, db)
    try:
        assert infer_ok(node.grpc_address, "ops-corrupt")  # a device's Infer over mTLS
        assert any("fleet plane degraded" in line and str(db) in line for line in node.banner())
        url = node.dashboard_url
        status, health = http(url + "healthz")
        assert status == 503 and health["ok"] is False and health["status"] == "degraded"
        store = health["components"]["store"]
        assert store["status"] == "degraded" and "file is not a database" in store["reason"]
        assert health["components"]["grpc"] == {"status": "ok"}
        status, fleet = http(url + "api/fleet")
        assert status == 200 and fleet["devices"] == []
        assert any("store degraded" in w and "file is not a database" in w for w in fleet["warnings"])  # banner
        # The page is open on loopback (no --dashboard-token-file), the command API is not: it needs the CA
        # folder's dashboard.token, which split-cloud fleet sends.
        status, answer = http(url + "api/devices/cam-1/commands", body={"kind": "ping"})
        assert status == 401 and "dashboard token" in answer["error"], answer
        auth = {"Authorization": f"Bearer {(default_pki_dir() / 'dashboard.token').read_text().strip()}"}
        status, answer = http(url + "api/devices/cam-1/commands", body={"kind": "ping"}, headers=auth)
        assert status == 503, answer
        assert metric(url, "splitinfer_fleet_store_up") == 0  # present and down, so an alert on it fires
        assert db.read_bytes() == bytes(range(256)) * 64  # left as it was for the operator to look at
    finally:
        node.stop(grace=1.0)


def metric(url: str, line_start: str) -> float | None:
    """The value of the /metrics sample whose line starts with `line_start` (None: absent)."""
    with urllib.request.urlopen(url + "metrics", timeout=DEADLINE_S) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


def publish_telemetry(node: CloudNode, device_id: str, n: int) -> None:
    """One telemetry batch of `n` records from `device_id` (its certificate), acknowledged by the broker."""
    import paho.mqtt.client as mqtt

    from protos.mqtt import TELEMETRY, MqttTls, TelemetryBatch, device_topic
    from tests.pki import device_folder

    folder = device_folder(device_id)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    MqttTls(str(folder / "ca.pem"), str(folder / "device.pem"), str(folder / "device.key")).apply(client)
    client.connect(node.broker_host, node.broker_port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(device_topic(device_id, TELEMETRY),
                              TelemetryBatch(tuple(_records(n)), batch_id=uuid.uuid4().hex).to_json(), qos=1)
        info.wait_for_publish(DEADLINE_S)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_healthz_reports_each_component_and_a_store_that_starts_failing(bundles: Path, tmp_path: Path) -> None:
    node = start_node(bundles, tmp_path / "fleet.db")
    try:
        url = node.dashboard_url
        status, health = http(url + "healthz")
        assert status == 200 and health["status"] == "ok"
        assert {k: v["status"] for k, v in health["components"].items()} == {
            "grpc": "ok", "broker": "ok", "controller": "ok", "store": "ok"}
        assert metric(url, "splitinfer_fleet_store_up") == 1
        # A real SQLite fault: the file may not grow any more (as on a full disk).
        with node.store._wlock:  # between the controller's transactions
            pages = node.store._writer.execute("PRAGMA page_count").fetchone()[0]
            node.store._writer.execute(f"PRAGMA max_page_count = {pages}")
        publish_telemetry(node, "ops-full", 3000)
        polling.wait_for(lambda: (metric(url, 'splitinfer_fleet_store_errors_total{kind="disk_full"}') or 0) >= 1,
                         "the failed write counted by kind", DEADLINE_S)
        assert metric(url, "splitinfer_fleet_store_up") == 0
        status, health = http(url + "healthz")
        assert status == 503 and health["status"] == "degraded"
        assert health["components"]["store"]["status"] == "degraded"
        assert "database or disk is full" in health["components"]["store"]["reason"]
        assert node.store.record_count("ops-full") == 0
        with node.store._wlock:  # space again: the retry stores it
            node.store._writer.execute("PRAGMA max_page_count = 1073741823")
        polling.wait_for(lambda: node.store.record_count("ops-full") == 3000, "the batch stored on retry", DEADLINE_S)
        polling.wait_for(lambda: http(url + "healthz")[0] == 200, "healthz ok again", DEADLINE_S)
        assert metric(url, 'splitinfer_fleet_records_dropped_total{reason="store_refused"}') is None
    finally:
        node.stop(grace=1.0)


def _records(n: int) -> list[Any]:
    from protos.mqtt import TelemetryRecord

    return [TelemetryRecord(f"f{i}", time.time(), 1, 1, 1, 1, 1, 5, "cloud", "c1") for i in range(n)]


@pytest.fixture()
def node_and_agent(bundles: Path, tmp_path: Path) -> Iterator[tuple[CloudNode, EdgeAgent, ControlLink, Path]]:
    token = tmp_path / "dashboard.token"
    token.write_text("ops-token-0123456789abcdef\n")
    node = start_node(bundles, tmp_path / "fleet.db", dashboard_token_file=token)
    try:
        agent = EdgeAgent.from_bundle(bundles / "tiny", node.grpc_address, device_id="ops-1",
                                      tls=device_tls("ops-1"), connect_timeout_s=2.0, probe_count=1,
                                      backoff={"initial_s": 0.05, "max_s": 0.3},
                                      mqtt={"broker": node.broker_address, "flush_interval_ms": 50})
        try:
            link = ControlLink(agent, agent.config.mqtt).start(wait_s=DEADLINE_S)
            try:
                assert agent.wait_for_mode(SPLIT, DEADLINE_S)
                polling.wait_for(lambda: (d := node.store.device("ops-1")) and d["cut"] == MID_CUT,
                                 "ops-1's state in the store", DEADLINE_S)
                yield node, agent, link, token
            finally:
                link.close()
        finally:
            agent.close()
    finally:
        node.stop(grace=1.0)


def fleet(*args: str) -> tuple[int, str, str]:
    """`split-cloud fleet ARGS` through split-cloud's own parser: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    parsed = cli.build_parser().parse_args(["fleet", *args])
    return fleet_cli.run(parsed, out, err), out.getvalue(), err.getvalue()


def test_fleet_send_switches_a_real_agents_cut_once_and_the_ack_is_stored(node_and_agent) -> None:
    node, agent, link, token = node_and_agent
    where = ["--url", node.dashboard_url, "--token-file", str(token)]
    rc, out, err = fleet("send", "ops-1", "switch-cut", CLOUD_ONLY, *where, "--timeout", "10")
    assert rc == 0, err
    assert out.startswith("switch-cut to ops-1: ok") and "command " in out
    assert agent.cut == CLOUD_ONLY and link.applied == {"switch_cut": 1}
    command_id = out.rsplit("command ", 1)[1].rstrip(")\n")
    polling.wait_for(lambda: (node.store.command(command_id) or {}).get("ok") is True, "the ack stored", DEADLINE_S)
    polling.wait_for(lambda: node.store.device("ops-1")["cut"] == CLOUD_ONLY, "the new cut in the state", DEADLINE_S)
    assert agent.infer(sample_input(), timeout=DEADLINE_S).cut == CLOUD_ONLY

    rc, out, err = fleet("ls", *where, "--json")
    assert rc == 0, err
    row = {d["device"]: d for d in json.loads(out)["devices"]}["ops-1"]
    assert (row["status"], row["mode"], row["cut"]) == ("online", SPLIT, CLOUD_ONLY)
    rc, out, _ = fleet("ls", *where)
    assert rc == 0 and out.splitlines()[0].split() == ["DEVICE", "STATUS", "MODE", "CUT", "P50", "MS", "REQ/S",
                                                        "LAST", "SEEN"]
    assert out.splitlines()[1].split()[:4] == ["ops-1", "online", SPLIT, CLOUD_ONLY]

    # A cut the bundle does not have: the device refuses, the CLI says why and exits 1; nothing was applied.
    rc, _, err = fleet("send", "ops-1", "switch-cut", "c42", *where)
    assert rc == 1 and "refused by the device" in err and "c42" in err
    rc, out, err = fleet("send", "ops-1", "ping", *where)
    assert rc == 0, err
    assert link.applied == {"switch_cut": 1, "ping": 1}
    # Unknown device: 404 from the API, exit 2; no token: 401, exit 2.
    rc, _, err = fleet("send", "nobody", "ping", *where)
    assert rc == 2 and "unknown" in err
    rc, _, err = fleet("ls", "--url", node.dashboard_url, "--token-file", str(token.with_name("none")))
    assert rc == 2


def test_the_command_api_answers_with_the_ack_or_a_clear_status(node_and_agent) -> None:
    node, agent, link, token = node_and_agent
    url = node.dashboard_url + "api/devices/ops-1/commands"
    auth = {"Authorization": f"Bearer {token.read_text().strip()}"}
    status, answer = http(url, body={"kind": "switch_mode", "mode": "local"}, headers=auth)
    assert status == 200 and answer["ok"] is True and answer["kind"] == "switch_mode", answer
    assert link.applied == {"switch_mode": 1}
    assert http(url, body={"kind": "ping"})[0] == 401  # token-protected as the dashboard is
    for bad in ({"kind": "reboot"}, {"kind": "switch_cut"}, {"kind": "switch_mode", "mode": "turbo"},
                {"kind": "ping", "timeout_s": 0}, {"kind": "ping", "extra": 1}, [1, 2]):
        status, answer = http(url, body=bad, headers=auth)
        assert status == 400 and answer["error"], (bad, answer)
    assert http(url, body=b"{not json", headers=auth)[0] == 400
    assert http(url, body={"kind": "ping"}, headers=auth, content_type="text/plain")[0] == 415  # no simple CSRF
    assert http(node.dashboard_url + "api/devices/nobody/commands", body={"kind": "ping"}, headers=auth)[0] == 404
    # A device that is known but gone: no ack within the timeout -> 504, exit 1 from the CLI.
    link.close()
    polling.wait_for(lambda: node.store.device("ops-1")["status"] == "offline", "ops-1 offline", DEADLINE_S)
    status, answer = http(url, body={"kind": "ping", "timeout_s": 0.3}, headers=auth)
    assert status == 504 and "no ack" in answer["error"]
    rc, _, err = fleet("send", "ops-1", "ping", "--url", node.dashboard_url, "--token-file", str(token),
                       "--timeout", "0.3")
    assert rc == 1 and "no ack within 0.3 s" in err


def test_a_secure_node_without_a_dashboard_token_refuses_every_command(bundles: Path, tmp_path: Path) -> None:
    """A CA folder without dashboard.token (made before it existed) must not leave the command API open."""
    import shutil

    pki = tmp_path / "pki"
    pki.mkdir()
    for f in default_pki_dir().iterdir():
        if f.is_file() and f.name != "dashboard.token":
            shutil.copy2(f, pki / f.name)
    node = CloudNode(bundles, ServerConfig(port=0, prefer_gpu=False, pki_dir=pki),
                     NodeOptions(db_path=tmp_path / "fleet.db", dashboard_port=0, embedded_broker_port=0)).start()
    try:
        url = node.dashboard_url + "api/devices/cam-1/commands"
        assert http(url, body={"kind": "ping"})[0] == 401
        session_token = (default_pki_dir() / "dashboard.token").read_text().strip()
        assert http(url, body={"kind": "ping"}, headers={"Authorization": f"Bearer {session_token}"})[0] == 401
    finally:
        node.stop(grace=1.0)
