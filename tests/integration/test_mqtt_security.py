"""The MQTT plane tried as an attacker would, on both brokers: real Mosquitto with the configuration
`split-cloud mosquitto-config` writes, and the embedded amqtt broker in its default (secure) mode.

A device with a valid certificate works end to end; a client without a certificate, with one from another CA,
or with a revoked one cannot connect; a device cannot publish on another device's topics or read another's
commands; a client with a device's id but without its key cannot take over its session.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_tier.broker import EmbeddedBroker
from cloud_tier.cli import main as cloud_main
from cloud_tier.controller import FleetController
from cloud_tier.fleet_store import FleetStore
from cloud_tier.lab.mosquitto import Mosquitto, free_port, mosquitto_path
from cloud_tier.pki import CertificateAuthority, Identity, PkiError, write_private
from edge_agent.mqtt_control import AgentControl
from protos.mqtt import (
    ACK,
    CMD,
    STATE,
    TELEMETRY,
    Ack,
    Command,
    DeviceState,
    MqttTls,
    TelemetryBatch,
    TelemetryRecord,
    device_topic,
)
from tests import polling

DEADLINE_S = 20.0


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
    """Poll `cond` until truthy; fail naming `what` at the deadline."""
    return polling.wait_for(cond, what, timeout_s)


@dataclass
class Broker:
    kind: str
    port: int
    host: str = "127.0.0.1"
    mosquitto: Mosquitto | None = None


@pytest.fixture(scope="module", params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest, pki: CertificateAuthority,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A TLS broker with the deployment CA: Mosquitto (generated config) or the embedded one (default mode)."""
    if request.param == "mosquitto":
        if mosquitto_path() is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        mosq = Mosquitto(tmp_path_factory.mktemp("mosquitto-tls"), pki=pki.dir)
        yield Broker("mosquitto", mosq.start(), mosquitto=mosq)
        mosq.stop()
    else:
        embedded = EmbeddedBroker("127.0.0.1", 0, pki=pki.dir)
        yield Broker("embedded", embedded.start())
        embedded.stop()


@pytest.fixture()
def controller(broker: Broker, controller_tls: MqttTls, tmp_path: Path) -> Iterator[FleetController]:
    """The fleet controller with its certificate, on a fresh store."""
    store = FleetStore(tmp_path / "fleet.sqlite")
    ctl = FleetController(store, broker.host, broker.port, tls=controller_tls).start(wait_s=DEADLINE_S)
    yield ctl
    ctl.stop()
    store.close()


@dataclass
class RawClient:
    """A paho client that records what happens to it: connect results, disconnects, messages, subacks."""

    client: Any
    connects: list[str] = field(default_factory=list)
    disconnects: int = 0
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    subacks: list[list[int]] = field(default_factory=list)
    answered: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def raw_client(port: int, client_id: str, tls: MqttTls | None, *, clean_session: bool = True) -> RawClient:
    """Connect a paho client and wait for the broker's answer (CONNACK, or the connection closed)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                         protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    raw = RawClient(client)
    if tls is not None:
        tls.apply(client)

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        raw.connects.append("refused" if rc.is_failure else "connected")
        raw.answered.set()

    def on_disconnect(_c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        raw.disconnects += 1
        raw.answered.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = lambda _c, _u, msg: raw.messages.append((msg.topic, msg.payload))
    client.on_subscribe = lambda _c, _u, _mid, rcs, _p: raw.subacks.append([rc.value for rc in rcs])
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        raw.connects.append(f"error: {exc}")
        raw.answered.set()
        return raw
    client.loop_start()
    assert raw.answered.wait(DEADLINE_S), f"broker on {port} neither accepted nor refused {client_id!r}"
    return raw


def admitted(port: int, client_id: str, tls: MqttTls | None) -> bool:
    """Whether the broker lets `client_id` connect with `tls`."""
    raw = raw_client(port, client_id, tls)
    try:
        return raw.connects == ["connected"] and raw.disconnects == 0
    finally:
        raw.stop()


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def record(request_id: str, ts: float | None = None) -> TelemetryRecord:
    return TelemetryRecord(request_id, time.time() if ts is None else ts, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, "cloud", "c1")


# --- end to end ------------------------------------------------------------------------------------------


def test_a_device_with_its_certificate_works_end_to_end(broker: Broker, controller: FleetController,
                                                         mqtt_tls: Callable[[str], MqttTls]) -> None:
    got: list[str] = []
    agent = AgentControl("sec-ok", broker.host, broker.port, flush_interval_ms=20, tls=mqtt_tls("sec-ok"),
                         on_command=lambda c: got.append(c.command_id) or Ack(c.command_id, True, "done"))
    agent.start(wait_s=DEADLINE_S)
    try:
        agent.record(record("ok-1"))
        agent.record(record("from-the-future", ts=time.time() + 115 * 86400))  # a wrong clock, or a forgery
        wait_for(lambda: controller.store.record_count("sec-ok") == 2, "the device's telemetry in the store")
        assert controller.future_timestamps == 1
        latest = controller.store._reader().execute("SELECT MAX(ts) FROM requests WHERE device_id = 'sec-ok'")
        assert latest.fetchone()[0] <= time.time()  # stored at its receipt time
        cid = controller.send_command("sec-ok", Command.switch_mode("local"))
        assert controller.wait_ack(cid, DEADLINE_S) == Ack(cid, True, "done")
        assert got == [cid]
    finally:
        agent.close()
    wait_for(lambda: controller.store.device("sec-ok")["status"] == "offline", "the device's offline state")


# --- who may connect -------------------------------------------------------------------------------------


def test_a_client_without_a_certificate_cannot_connect(broker: Broker, pki: CertificateAuthority) -> None:
    assert not admitted(broker.port, "anon", None), "a plaintext anonymous client was let in"
    no_cert = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="nocert", protocol=mqtt.MQTTv311)
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))  # the broker's certificate checked, none of ours
    no_cert.tls_set_context(ctx)
    refused = threading.Event()
    no_cert.on_disconnect = lambda *_: refused.set()
    no_cert.on_connect = lambda _c, _u, _f, rc, _p: (rc.is_failure and refused.set())
    try:
        no_cert.connect("127.0.0.1", broker.port, keepalive=10)
        no_cert.loop_start()
        assert refused.wait(DEADLINE_S), "a TLS client without a certificate was let in"
    except (OSError, ssl.SSLError):
        pass  # refused during the handshake
    finally:
        no_cert.loop_stop()
        no_cert.disconnect()


def test_a_certificate_from_another_ca_cannot_connect(broker: Broker, pki: CertificateAuthority,
                                                     tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other-ca")
    folder = other.enroll("sec-foreign", tmp_path / "foreign")
    # The client trusts the real broker; only its own certificate is foreign.
    tls = MqttTls(str(pki.ca_cert), str(folder / "device.pem"), str(folder / "device.key"))
    assert not admitted(broker.port, "sec-foreign", tls)


def test_a_revoked_device_cannot_connect(broker: Broker, pki: CertificateAuthority,
                                         mqtt_tls: Callable[[str], MqttTls]) -> None:
    device = f"sec-revoked-{broker.kind}"
    tls = mqtt_tls(device)
    assert admitted(broker.port, device, tls)
    pki.revoke(device)
    if broker.mosquitto is None:
        # The embedded broker reads the CRL at every connect: the revocation counts at once.
        assert not admitted(broker.port, device, tls)
    else:
        # Mosquitto reads the CRL when it starts and on SIGHUP (`systemctl reload mosquitto`).
        broker.mosquitto.reload()
        wait_for(lambda: not admitted(broker.port, device, tls), "Mosquitto refusing the revoked device")
    assert admitted(broker.port, "sec-after-revoke", mqtt_tls("sec-after-revoke"))  # the others still can


def test_the_client_id_must_be_the_certificates_identity_on_the_embedded_broker(
        broker: Broker, mqtt_tls: Callable[[str], MqttTls]) -> None:
    if broker.kind != "embedded":
        pytest.skip("Mosquitto replaces the client id with the identity (use_username_as_clientid)")
    assert not admitted(broker.port, "someone-else", mqtt_tls("sec-id"))
    assert admitted(broker.port, "sec-id", mqtt_tls("sec-id"))


def test_a_device_certificate_named_controller_is_not_the_controller_on_the_embedded_broker(
        broker: Broker, pki: CertificateAuthority, tmp_path: Path) -> None:
    if broker.kind != "embedded":
        pytest.skip("Mosquitto knows identities by CN only: the CA must not issue a device id 'controller'")
    with pytest.raises(PkiError, match="reserved"):
        pki.enroll("controller", tmp_path / "refused")
    # `enroll` refuses the id; a certificate made past that check is still not the controller on this broker.
    cert, key = pki._issue(Identity("device", "controller"), days=1, server_hosts=None)
    (tmp_path / "device.pem").write_bytes(cert)
    write_private(tmp_path / "device.key", key)
    tls = MqttTls(str(pki.ca_cert), str(tmp_path / "device.pem"), str(tmp_path / "device.key"))
    assert not admitted(broker.port, "controller", tls)


def test_a_device_revoked_while_connected_is_cut_off_on_the_embedded_broker(
        broker: Broker, controller: FleetController, pki: CertificateAuthority,
        mqtt_tls: Callable[[str], MqttTls]) -> None:
    if broker.mosquitto is not None:
        pytest.skip("Mosquitto applies a new CRL to new connections after SIGHUP (the test above)")
    device = "sec-cut-off"
    raw = raw_client(broker.port, device, mqtt_tls(device))
    try:
        assert raw.connects == ["connected"]
        raw.client.subscribe(device_topic(device, CMD), qos=1)
        wait_for(lambda: raw.subacks, "the device's SUBACK")
        raw.client.publish(device_topic(device, TELEMETRY), TelemetryBatch((record("before"),)).to_json(), qos=1)
        wait_for(lambda: controller.store.record_count(device) == 1, "telemetry before the revocation")
        pki.revoke(device)
        # Still connected, but neither its telemetry nor the controller's commands pass any more.
        raw.client.publish(device_topic(device, TELEMETRY), TelemetryBatch((record("after"),)).to_json(), qos=1)
        controller.send_command(device, Command.ping())
        marker = raw_client(broker.port, "sec-cut-marker", mqtt_tls("sec-cut-marker"))
        try:  # a later message of another device is stored: the revoked one's, sent before it, was not
            marker.client.publish(device_topic("sec-cut-marker", TELEMETRY),
                                  TelemetryBatch((record("marker"),)).to_json(), qos=1)
            wait_for(lambda: controller.store.record_count("sec-cut-marker") == 1, "the marker's telemetry")
        finally:
            marker.stop()
        assert controller.store.record_count(device) == 1, "a revoked device's telemetry was stored"
        assert [t for t, _ in raw.messages] == [], "a command reached a revoked device"
    finally:
        raw.stop()


# --- what a connected device may do ----------------------------------------------------------------------


def test_a_device_cannot_use_another_devices_topics(broker: Broker, controller: FleetController,
                                                    mqtt_tls: Callable[[str], MqttTls]) -> None:
    victim_cmds: list[str] = []
    victim = AgentControl("sec-victim", broker.host, broker.port, flush_interval_ms=20, label="real",
                          tls=mqtt_tls("sec-victim"),
                          on_command=lambda c: victim_cmds.append(c.command_id) or Ack(c.command_id, True, "ok"))
    victim.start(wait_s=DEADLINE_S)
    wait_for(lambda: (d := controller.store.device("sec-victim")) and d["label"] == "real", "the victim's state")
    thief = raw_client(broker.port, "sec-thief", mqtt_tls("sec-thief"))
    try:
        assert thief.connects == ["connected"]
        thief.client.subscribe([("splitinfer/v1/#", 1), (device_topic("sec-victim", CMD), 1),
                                (device_topic("sec-thief", CMD), 1)])
        wait_for(lambda: thief.subacks, "the thief's SUBACK")
        # Forgeries on the victim's topics, then a marker on the thief's own telemetry topic.
        forged_state = DeviceState("online", label="forged", ts=time.time() + 115 * 86400).to_json()
        thief.client.publish(device_topic("sec-victim", STATE), forged_state, qos=1, retain=True)
        thief.client.publish(device_topic("sec-victim", TELEMETRY), TelemetryBatch((record("forged"),)).to_json(),
                             qos=1)
        thief.client.publish(device_topic("sec-victim", ACK), Ack("forged-ack", True).to_json(), qos=1)
        thief.client.publish(device_topic("sec-victim", CMD), Command.switch_cut("cloud-only").to_json(), qos=1)
        thief.client.publish(device_topic("sec-thief", TELEMETRY), TelemetryBatch((record("marker"),)).to_json(),
                             qos=1)
        wait_for(lambda: controller.store.record_count("sec-thief") == 1, "the thief's own telemetry")
        # Commands to the victim (acked by the victim) and then to the thief.
        ping = controller.send_command("sec-victim", Command.ping())
        assert controller.wait_ack(ping, DEADLINE_S) == Ack(ping, True, "ok")
        own = controller.send_command("sec-thief", Command.ping())
        wait_for(lambda: any(t == device_topic("sec-thief", CMD) for t, _ in thief.messages), "the thief's own cmd")
        assert victim_cmds == [ping], "a forged command reached the victim"
        assert controller.store.record_count("sec-victim") == 0, "forged telemetry was stored"
        assert controller.store.device("sec-victim")["label"] == "real", "a forged state was stored"
        assert controller.wait_ack("forged-ack", 0) is None, "a forged ack reached the controller"
        assert [t for t, _ in thief.messages] == [device_topic("sec-thief", CMD)], \
            f"the thief read other topics: {[t for t, _ in thief.messages]}"
        assert own
    finally:
        thief.stop()
        victim.close()


def test_a_second_client_with_a_devices_id_but_not_its_key_cannot_take_over(
        broker: Broker, controller: FleetController, mqtt_tls: Callable[[str], MqttTls]) -> None:
    owner = raw_client(broker.port, "sec-owner", mqtt_tls("sec-owner"), clean_session=False)
    try:
        assert owner.connects == ["connected"]
        owner.client.subscribe(device_topic("sec-owner", CMD), qos=1)
        wait_for(lambda: owner.subacks, "the owner's SUBACK")
        # Another enrolled device presents its own certificate under the owner's client id.
        intruder = raw_client(broker.port, "sec-owner", mqtt_tls("sec-intruder"))
        try:
            if broker.kind == "embedded":
                assert intruder.connects != ["connected"], "the embedded broker let the intruder in"
            else:  # Mosquitto admits it, but as its own identity (use_username_as_clientid)
                assert intruder.connects == ["connected"]
                intruder.client.subscribe(device_topic("sec-owner", CMD), qos=1)
                wait_for(lambda: intruder.subacks, "the intruder's SUBACK")
            cmd = Command.ping()
            controller.send_command("sec-owner", cmd)
            wait_for(lambda: owner.messages, "the owner's command")
            assert owner.messages == [(device_topic("sec-owner", CMD), cmd.to_json().encode())]
            assert owner.disconnects == 0, "the owner's session was taken over"
            assert intruder.messages == [], "the intruder read the owner's commands"
        finally:
            intruder.stop()
    finally:
        owner.stop()


# --- the generated Mosquitto configuration ---------------------------------------------------------------


def test_mosquitto_config_command_writes_the_tls_config_and_the_acl(pki: CertificateAuthority, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cloud_main(["mosquitto-config", "--out", str(tmp_path / "conf"), "--pki", str(pki.dir),
                       "--port", "8883", "--host", "0.0.0.0"]) == 0
    conf = (tmp_path / "conf" / "mosquitto.conf").read_text().splitlines()
    for line in ("listener 8883 0.0.0.0", "require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true", "allow_anonymous false", f"crlfile {pki.crl.resolve()}",
                 f"cafile {pki.ca_cert.resolve()}", f"certfile {pki.server_cert.resolve()}",
                 f"keyfile {(tmp_path / 'conf' / 'server.key').resolve()}",
                 f"acl_file {(tmp_path / 'conf' / 'acl').resolve()}"):
        assert line in conf
    key = tmp_path / "conf" / "server.key"  # a copy the broker's own user can read; the CA's stays 0600
    assert key.read_bytes() == pki.server_key.read_bytes() and key.stat().st_mode & 0o077 == 0
    acl = (tmp_path / "conf" / "acl").read_text()
    assert "pattern read splitinfer/v1/devices/%u/cmd" in acl
    assert "pattern write splitinfer/v1/devices/%u/telemetry" in acl
    assert "mosquitto -c" in capsys.readouterr().out
    assert cloud_main(["mosquitto-config", "--out", str(tmp_path / "x"), "--pki", str(tmp_path / "nope")]) == 2


@pytest.mark.skipif(mosquitto_path() is None or os.geteuid() != 0, reason="needs mosquitto, started as root")
def test_mosquitto_started_as_root_runs_the_generated_config_as_its_own_user(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the README says to do: `mosquitto -c` as root drops to the mosquitto user, who must still read the
    ACL, the key copy and the CA folder's public files (a CA folder on a path others may traverse)."""
    state = Path(tempfile.mkdtemp(prefix="si-state-"))
    try:
        os.chmod(state, 0o711)
        ca = CertificateAuthority.init(state / "pki", ["127.0.0.1"])
        port = free_port()
        assert cloud_main(["mosquitto-config", "--out", str(state / "mosq"), "--pki", str(ca.dir),
                           "--port", str(port), "--host", "127.0.0.1"]) == 0
        proc = subprocess.Popen([str(mosquitto_path()), "-c", str(state / "mosq" / "mosquitto.conf")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            folder = ca.enroll("sec-root", state / "dev")
            tls = MqttTls(str(folder / "ca.pem"), str(folder / "device.pem"), str(folder / "device.key"))
            wait_for(lambda: proc.poll() is not None or listening("127.0.0.1", port), "mosquitto listening")
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert admitted(port, "sec-root", tls)
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(state, ignore_errors=True)


# --- the insecure mode is explicit and loopback only -----------------------------------------------------


def test_plaintext_is_refused_off_loopback_unless_asked_for(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="i-know-insecure"):
        AgentControl("sec-plain", "cloud.invalid", 1883, on_command=lambda c: Ack(c.command_id, True))
    store = FleetStore(tmp_path / "fleet.sqlite")
    try:
        with pytest.raises(ValueError, match="plaintext MQTT to 'cloud.invalid' is refused"):
            FleetController(store, "cloud.invalid", 1883)
    finally:
        store.close()
    with pytest.raises(Exception, match="plaintext MQTT to '0.0.0.0' is refused"):
        EmbeddedBroker("0.0.0.0", 0, insecure=True)
    with pytest.raises(Exception, match="needs the CA folder"):
        EmbeddedBroker("127.0.0.1", 0)
    with caplog.at_level("WARNING"):
        EmbeddedBroker("0.0.0.0", 0, insecure=True, i_know_insecure=True)  # allowed, never started
        AgentControl("sec-plain", "127.0.0.1", 1883, on_command=lambda c: Ack(c.command_id, True))
    assert caplog.text.count("INSECURE") == 2
