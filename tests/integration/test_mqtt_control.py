"""MQTT control plane against a real Mosquitto: last will, offline commands, telemetry into SQLite and the API."""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_tier.broker import EmbeddedBroker
from cloud_tier.controller import FleetController
from cloud_tier.dashboard import Dashboard
from cloud_tier.fleet_store import FleetStore
from cloud_tier.lab.mosquitto import Mosquitto
from cloud_tier.pki import CertificateAuthority
from edge_agent.mqtt_control import AgentControl
from protos.mqtt import STATE, TELEMETRY, Ack, Command, MqttTls, TelemetryBatch, TelemetryRecord, device_topic
from tests import polling

AGENT_PROC = Path(__file__).with_name("mqtt_agent_proc.py")
DEADLINE_S = 20.0


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
    """Poll `cond` until truthy; fail naming `what` at the deadline."""
    return polling.wait_for(cond, what, timeout_s)


class AgentProc:
    """A subprocess running AgentControl (see mqtt_agent_proc.py)."""

    def __init__(self, device_id: str, port: int, applied_log: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT_PROC), device_id, "127.0.0.1", str(port), str(applied_log)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=DEADLINE_S)
        sel.close()
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if line != "ready":
            self.kill()
            err = self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else ""
            raise AssertionError(f"agent process for {device_id} did not become ready (got {line!r}): {err}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.flush()
        self.proc.wait(15)
        self.kill()


def applied(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_killed_agent_shows_offline_via_last_will(fleet: tuple[FleetStore, FleetController], tmp_path: Path,
                                                   mosquitto: Mosquitto) -> None:  # noqa: F811
    store, _ = fleet
    agent = AgentProc("killed-1", mosquitto.port, tmp_path / "applied.jsonl")
    try:
        row = wait_for(lambda: (d := store.device("killed-1")) and d["cut"] == "c1" and d, "online state")
        assert row["status"] == "online" and row["mode"] == "split"
    finally:
        agent.kill()  # SIGKILL: no goodbye, only the broker's last will can say it
    row = wait_for(lambda: (d := store.device("killed-1")) and d["status"] == "offline" and d, "last will")
    assert row["status"] == "offline"


def test_command_sent_while_offline_is_applied_once_on_reconnect(
    fleet: tuple[FleetStore, FleetController], tmp_path: Path, mosquitto: Mosquitto  # noqa: F811
) -> None:
    store, ctl = fleet
    log = tmp_path / "applied.jsonl"
    first = AgentProc("resume-1", mosquitto.port, log)  # registers the persistent session + subscription
    first.kill()
    wait_for(lambda: (d := store.device("resume-1")) and d["status"] == "offline", "offline after kill")

    cmd = Command.switch_cut("c9")
    assert ctl.send_command("resume-1", cmd) == cmd.command_id
    assert applied(log) == []  # nobody there to apply it yet

    second = AgentProc("resume-1", mosquitto.port, log)
    try:
        ack = ctl.wait_ack(cmd.command_id, DEADLINE_S)
        assert ack == Ack(cmd.command_id, True, "applied switch_cut")
        # A redelivery with the same id (e.g. after a lost PUBACK) must not be applied again.
        ctl.send_command("resume-1", cmd)
        barrier = ctl.send_command("resume-1", Command.ping())  # QoS 1 on one topic: delivered in order
        assert ctl.wait_ack(barrier, DEADLINE_S) is not None
        wait_for(lambda: (store.command(cmd.command_id) or {}).get("ok") is True, "ack stored")
    finally:
        second.quit()
    entries = applied(log)
    cuts = [e for e in entries if e["command"]["kind"] == "switch_cut"]
    assert len(cuts) == 1, entries
    assert cuts[0]["command"] == {"command_id": cmd.command_id, "kind": "switch_cut", "cut": "c9"}
    assert cuts[0]["pid"] == second.proc.pid
    wait_for(lambda: store.device("resume-1")["status"] == "offline", "offline after a clean close")


def test_telemetry_equals_store_and_api(fleet: tuple[FleetStore, FleetController], tmp_path: Path,
                                        mosquitto: Mosquitto) -> None:  # noqa: F811
    store, ctl = fleet
    rng = random.Random(3)
    now = time.time()
    sent: dict[str, list[TelemetryRecord]] = {"tele-a": [], "tele-b": []}
    agents = [AgentControl(d, mosquitto.host, mosquitto.port, on_command=lambda c: Ack(c.command_id, True),
                           flush_interval_ms=20, max_batch=37, label=f"label {d}").start()
              for d in sent]
    dash = Dashboard(store)
    dash.start()
    try:
        for agent in agents:
            agent.publish_state(mode="split", cut="c2", bandwidth_mbps=5.85, model="toy")
            for i in range(300):
                st = [rng.uniform(0.05, 30.0) for _ in range(5)]
                rec = TelemetryRecord(f"{agent.device_id}-{i}", now - 5 + i * 0.01, *st, sum(st),
                                      "edge" if rng.random() < 0.3 else "cloud", "c2")
                assert agent.record(rec)
                sent[agent.device_id].append(rec)
        wait_for(lambda: store.record_count() == 600, "600 stored records")
        with urllib.request.urlopen(f"{dash.url}/api/fleet", timeout=10) as resp:
            api = {r["device"]: r for r in json.load(resp)["devices"]}
        for device_id, recs in sent.items():
            assert store.record_count(device_id) == len(recs)
            stored = store._reader().execute("SELECT request_id, total_ms FROM requests WHERE device_id = ?",
                                             (device_id,)).fetchall()
            assert sorted(stored) == sorted((r.request_id, r.total_ms) for r in recs)
            totals = [r.total_ms for r in recs]
            ref = statistics.quantiles(totals, n=100, method="inclusive")
            row = api[device_id]
            assert row["count"] == len(recs)
            assert row["status"] == "online" and row["cut"] == "c2" and row["mode"] == "split"
            assert row["label"] == f"label {device_id}" and row["bandwidth_mbps"] == 5.85
            for p in (50, 95, 99):
                assert row[f"p{p}_ms"] == pytest.approx(ref[p - 1], rel=1e-9)
            assert row["edge_share"] == pytest.approx(sum(r.served_by == "edge" for r in recs) / len(recs))
        with urllib.request.urlopen(f"{dash.url}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'splitinfer_device_up{device="tele-a"} 1' in metrics
        # prometheus_client writes label names sorted (Prometheus ignores their order): same sample as before.
        assert 'splitinfer_device_latency_ms{device="tele-b",quantile="0.95",stage="total"}' in metrics
    finally:
        for agent in agents:
            agent.close()
        dash.stop()
    assert ctl.bad_payloads == 0 and ctl.dropped_messages == 0


def test_telemetry_sent_while_the_controller_is_down_is_stored_when_it_returns(
    mosquitto: Mosquitto, tmp_path: Path  # noqa: F811
) -> None:
    _controller_outage(mosquitto.host, mosquitto.port, tmp_path)


def test_controller_outage_with_the_embedded_amqtt_broker(tmp_path: Path) -> None:
    broker = EmbeddedBroker("127.0.0.1", 0, insecure=True)  # the session mechanics; TLS: test_mqtt_security
    port = broker.start()
    try:
        _controller_outage("127.0.0.1", port, tmp_path)
    finally:
        broker.stop()


def test_command_sent_while_offline_reaches_the_agent_through_the_embedded_amqtt_broker(
        tmp_path: Path, pki: CertificateAuthority, controller_tls: MqttTls, mqtt_tls: Callable[[str], MqttTls]
) -> None:
    broker = EmbeddedBroker("127.0.0.1", 0, pki=pki.dir)  # the default (TLS) mode: persistent sessions work too
    port = broker.start()
    store = FleetStore(tmp_path / "fleet.sqlite")
    got: list[Command] = []

    def on_command(cmd: Command) -> Ack:
        got.append(cmd)
        return Ack(cmd.command_id, True, "applied")

    try:
        with FleetController(store, "127.0.0.1", port, tls=controller_tls) as ctl:
            AgentControl("away-1", "127.0.0.1", port, on_command=on_command, tls=mqtt_tls("away-1")).start().close()
            wait_for(lambda: (d := store.device("away-1")) and d["status"] == "offline", "offline after close")
            cmd = Command.switch_cut("c3")
            ctl.send_command("away-1", cmd)
            back = AgentControl("away-1", "127.0.0.1", port, on_command=on_command, tls=mqtt_tls("away-1")).start()
            try:
                assert ctl.wait_ack(cmd.command_id, DEADLINE_S) == Ack(cmd.command_id, True, "applied")
            finally:
                back.close()
        assert [c.command_id for c in got] == [cmd.command_id]
    finally:
        store.close()
        broker.stop()


def _controller_outage(host: str, port: int, tmp_path: Path) -> None:
    """Records sent while the store's controller is stopped reach the store once a controller runs on it again."""
    store = FleetStore(tmp_path / "fleet.sqlite")
    now = time.time()
    recs = tuple(TelemetryRecord(f"outage-{i}", now + i * 0.01, 1.0, 0.5, 2.0, 0.1, 3.0, 6.6, "cloud", "c2")
                 for i in range(12))
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect(host, port, keepalive=10)
    pub.loop_start()

    def send(batch: tuple[TelemetryRecord, ...]) -> None:
        info = pub.publish(device_topic("outage-1", TELEMETRY), TelemetryBatch(batch).to_json(), qos=1)
        info.wait_for_publish(DEADLINE_S)  # PUBACK: the broker holds it
        assert info.is_published()

    try:
        first = FleetController(store, host, port).start()
        try:
            send(recs[:5])
            wait_for(lambda: store.record_count("outage-1") == 5, "5 records while the controller is up")
        finally:
            first.stop()
        send(recs[5:])  # nobody subscribed now: the broker queues it for the controller's session
        second = FleetController(store, host, port).start()
        try:
            assert second.client_id == first.client_id  # the session id lives in the store
            wait_for(lambda: store.record_count("outage-1") == 12, "the 7 records sent during the outage")
        finally:
            second.stop()
    finally:
        pub.loop_stop()
        pub.disconnect()
    stored = store._reader().execute("SELECT request_id FROM requests WHERE device_id = 'outage-1'").fetchall()
    assert sorted(r for (r,) in stored) == sorted(r.request_id for r in recs)
    other = FleetStore(tmp_path / "other.sqlite")  # another store: another controller, another session
    try:
        elsewhere = FleetController(other, host, port)
        assert elsewhere.client_id != first.client_id
        elsewhere.stop()
    finally:
        other.close()
    store.close()


def test_a_second_controller_on_one_store_gets_its_own_clean_session(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    store = FleetStore(tmp_path / "fleet.sqlite")
    try:
        first = FleetController(store, "127.0.0.1", 0)  # never started: the session id is settled at construction
        with caplog.at_level("WARNING", logger="cloud_tier.controller"):
            second = FleetController(store, "127.0.0.1", 0)
        assert second.client_id != first.client_id
        assert "another controller already runs on the fleet store" in caplog.text
        second.stop()
        first.stop()
        third = FleetController(store, "127.0.0.1", 0)  # the first let go of the store: its session is free
        assert third.client_id == first.client_id
        third.stop()
    finally:
        store.close()


def test_bad_payloads_are_counted_and_the_controller_keeps_going(
    fleet: tuple[FleetStore, FleetController], mosquitto: Mosquitto  # noqa: F811
) -> None:
    store, ctl = fleet
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect(mosquitto.host, mosquitto.port, keepalive=10)
    pub.loop_start()
    try:
        bad = [(device_topic("bad-1", TELEMETRY), b"not json"),
               (device_topic("bad-1", TELEMETRY), b'{"records":[{"request_id":"x"}]}'),
               (device_topic("bad-1", STATE), b'{"status":"sleepy"}'),
               ("splitinfer/v1/devices/has space/state", b'{"status":"online"}')]
        for topic, payload in bad:
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
        pub.publish(device_topic("good-1", STATE), b'{"status":"online"}', qos=1).wait_for_publish(10)
        wait_for(lambda: store.device("good-1"), "the good state after the bad ones")
        # telemetry is parsed on the controller's batching path, states at once: wait for both counts
        wait_for(lambda: ctl.bad_payloads >= len(bad), "every bad payload counted")
        assert ctl.bad_payloads == len(bad)
        assert store.device("bad-1") is None and store.record_count("bad-1") == 0
    finally:
        pub.publish(device_topic("good-1", STATE), b"", qos=1, retain=True).wait_for_publish(10)
        pub.loop_stop()
        pub.disconnect()


def test_a_telemetry_batch_delivered_twice_is_stored_once(
    fleet: tuple[FleetStore, FleetController], mosquitto: Mosquitto  # noqa: F811
) -> None:
    # An agent that loses its link before the broker's PUBACK reaches it publishes the batch again (QoS 1 is
    # at-least-once) and the broker passes both copies on; here a client publishes the same payload twice.
    store, ctl = fleet
    now = time.time()
    batch = TelemetryBatch(tuple(TelemetryRecord(f"twice-{i}", now, 1, 1, 1, 1, 1, 5, "cloud", "c1")
                                 for i in range(5)), dropped=1, batch_id=uuid.uuid4().hex)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect(mosquitto.host, mosquitto.port, keepalive=10)
    pub.loop_start()
    try:
        for _ in range(2):
            pub.publish(device_topic("twice-1", TELEMETRY), batch.to_json(), qos=1).wait_for_publish(10)
        wait_for(lambda: ctl.duplicate_batches >= 1, "the second copy seen")
        assert store.record_count("twice-1") == 5 and store.device("twice-1")["dropped_total"] == 1
        assert ctl.duplicate_batches == 1 and ctl.telemetry_messages == 2
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_a_batch_published_as_the_link_drops_is_sent_once(fleet: tuple[FleetStore, FleetController],
                                                          mosquitto: Mosquitto) -> None:  # noqa: F811
    # The flusher checks the link, then publishes; when the link drops in between, paho answers "no connection"
    # but keeps the QoS 1 message and sends it after reconnecting. The agent must not also put it back.
    store, _ = fleet
    agent = AgentControl("drop-1", mosquitto.host, mosquitto.port, on_command=lambda c: Ack(c.command_id, True),
                         flush_interval_ms=20)
    now = time.time()
    for i in range(3):
        assert agent.record(TelemetryRecord(f"d{i}", now, 1, 1, 1, 1, 1, 5, "edge", "edge-only"))
    agent._connected.set()  # the flusher's view a moment before the link dropped: never connected, in fact
    agent._flush_once()
    agent._connected.clear()
    assert agent.buffered == 0  # paho holds the batch
    agent.start()
    try:
        wait_for(lambda: store.record_count("drop-1") >= 3, "the batch paho kept, sent on connect")
        # A marker recorded now is published after anything put back, and the broker keeps one client's order.
        assert agent.record(TelemetryRecord("marker", time.time(), 1, 1, 1, 1, 1, 5, "edge", "edge-only"))
        wait_for(lambda: store._reader().execute("SELECT 1 FROM requests WHERE request_id = 'marker'").fetchone(),
                 "the marker stored")
        assert store.record_count("drop-1") == 4
    finally:
        agent.close()


def test_agent_buffer_bound_counts_drops(fleet: tuple[FleetStore, FleetController],
                                         mosquitto: Mosquitto) -> None:  # noqa: F811
    store, _ = fleet
    agent = AgentControl("bound-1", mosquitto.host, mosquitto.port, on_command=lambda c: Ack(c.command_id, True),
                         telemetry_bound=3, flush_interval_ms=20)
    now = time.time()
    kept = [agent.record(TelemetryRecord(f"r{i}", now, 1, 1, 1, 1, 1, 5, "edge", "edge-only")) for i in range(5)]
    assert kept == [True, True, True, False, False] and agent.dropped_total == 2
    agent.start()  # nothing was connected yet: the buffer waits for the broker
    try:
        row = wait_for(lambda: (d := store.device("bound-1")) and d["dropped_total"] == 2 and d, "drop count")
        assert store.record_count("bound-1") == 3 and row["status"] == "online"
    finally:
        agent.close()


def test_embedded_amqtt_broker_round_trip(tmp_path: Path, pki: CertificateAuthority, controller_tls: MqttTls,
                                          mqtt_tls: Callable[[str], MqttTls]) -> None:
    broker = EmbeddedBroker(pki=pki.dir)
    port = broker.start()
    try:
        assert port > 0
        # amqtt would bind 0.0.0.0 by default: the embedded broker must only listen on loopback.
        bound = {s.getsockname()[0] for s in broker._broker._servers["default"].instance.sockets}
        assert bound == {"127.0.0.1"}
        got: list[Ack] = []
        store = FleetStore(tmp_path / "amqtt.sqlite")
        ctl = FleetController(store, "127.0.0.1", port, tls=controller_tls).start()
        agent = AgentControl("amqtt-1", "127.0.0.1", port, flush_interval_ms=20, tls=mqtt_tls("amqtt-1"),
                             on_command=lambda c: got.append(Ack(c.command_id, True, "pong")) or got[-1]).start()
        try:
            agent.record(TelemetryRecord("r1", time.time(), 1, 2, 3, 4, 5, 15, "cloud", "c1"))
            wait_for(lambda: store.record_count("amqtt-1") == 1, "telemetry through amqtt")
            cid = ctl.send_command("amqtt-1", Command.ping())
            assert ctl.wait_ack(cid, DEADLINE_S) == Ack(cid, True, "pong")
        finally:
            agent.close()
            wait_for(lambda: store.device("amqtt-1")["status"] == "offline", "offline state through amqtt")
            ctl.stop()
            store.close()
    finally:
        broker.stop()


def test_agent_control_imports_no_cloud_or_torch() -> None:
    code = ("import sys, edge_agent.mqtt_control; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'cloud_tier', 'partitioning', 'onnx'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
