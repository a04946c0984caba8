"""Presence: a device that stops answering (SIGSTOP: hung, or powered off without a goodbye) is shown offline
in the fleet store within 1.5x its MQTT keepalive, through its last will, on both brokers: the embedded amqtt
broker (whose keepalive enforcement cloud_tier.amqtt_auth adds) and Mosquitto. A device that keeps pinging
stays online meanwhile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud_tier.broker import EmbeddedBroker
from cloud_tier.controller import FleetController
from cloud_tier.fleet_store import FleetStore
from cloud_tier.lab.mosquitto import Mosquitto
from cloud_tier.pki import CertificateAuthority
from protos.mqtt import MqttTls
from tests.polling import wait_for

AGENT_PROC = Path(__file__).with_name("mqtt_agent_proc.py")
KEEPALIVE_S = 2
SLACK_S = 5.0  # the controller storing the will, and a loaded host


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request: pytest.FixtureRequest, pki: CertificateAuthority) -> Iterator[tuple[str, int]]:
    """(host, port) of a TLS broker of the session CA: the embedded amqtt one, or Mosquitto."""
    if request.param == "embedded":
        with EmbeddedBroker("127.0.0.1", 0, pki=pki.dir) as embedded:
            assert embedded.port is not None
            yield "127.0.0.1", embedded.port
    else:
        mosq: Mosquitto = request.getfixturevalue("mosquitto_tls")
        yield mosq.host, mosq.port


def _agent(device_id: str, host: str, port: int, tls: MqttTls, log: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(AGENT_PROC), device_id, host, str(port), str(log), str(KEEPALIVE_S), tls.ca, tls.cert,
         tls.key], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "ready" once subscribed (the child waits at most 15 s for that)
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"agent {device_id} did not start: {line!r} {proc.communicate(timeout=10)[1][-2000:]}")
    return proc


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait(timeout=10)


def test_a_stopped_agent_is_shown_offline_within_one_and_a_half_keepalives(
        broker: tuple[str, int], controller_tls: MqttTls, mqtt_tls: Callable[[str], MqttTls], tmp_path: Path) -> None:
    host, port = broker
    store = FleetStore(tmp_path / "fleet.db")
    ctl = FleetController(store, host, port, tls=controller_tls).start()
    procs: list[subprocess.Popen[str]] = []
    try:
        hung, alive = "presence-hung", "presence-alive"
        for device in (hung, alive):
            procs.append(_agent(device, host, port, mqtt_tls(device), tmp_path / f"{device}.log"))
        for device in (hung, alive):
            wait_for(lambda d=device: (store.device(d) or {}).get("status") == "online", f"{device} online")
        os.kill(procs[0].pid, signal.SIGSTOP)  # hung: its TCP connection stays open, nothing more is sent
        wait_for(lambda: store.device(hung)["status"] == "offline", f"{hung} offline (its last will)",
                 timeout_s=1.5 * KEEPALIVE_S + SLACK_S)
        # The agent that pings every keepalive was not timed out meanwhile.
        assert store.device(alive)["status"] == "online"
        assert procs[1].poll() is None
    finally:
        for proc in procs:
            _end(proc)
        ctl.stop()
        store.close()


def test_split_agent_run_with_a_short_mqtt_keepalive_is_shown_offline_when_stopped(
        broker: tuple[str, int], controller_tls: MqttTls, mqtt_tls: Callable[[str], MqttTls], tmp_path: Path) -> None:
    """The same with a real `split-agent run` ([mqtt] keepalive_s in its agent.toml; no cloud: it runs locally)."""
    from cloud_tier.lab.mosquitto import free_port
    from cloud_tier.lab.process import CHECKOUT, child_env
    from models.tiny_bundle import make_tiny_bundle

    host, port = broker
    device = "presence-run"
    tls = mqtt_tls(device)
    make_tiny_bundle(tmp_path / "tiny")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'bundle = "{tmp_path / "tiny"}"\ncloud = "127.0.0.1:{free_port()}"\ndevice_id = "{device}"\n'
        f'connect_timeout_s = 0.5\n[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
        "[input]\nrate = 5.0\ncount = 100000\n"
        f'[mqtt]\nbroker = "{host}:{port}"\nkeepalive_s = {KEEPALIVE_S}\nflush_interval_ms = 100\n')
    store = FleetStore(tmp_path / "fleet.db")
    ctl = FleetController(store, host, port, tls=controller_tls).start()
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config), "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=CHECKOUT, env=child_env())
    try:
        wait_for(lambda: (store.device(device) or {}).get("status") == "online" and store.record_count(device) > 0,
                 f"{device} online and reporting", timeout_s=60.0)
        os.kill(agent.pid, signal.SIGSTOP)
        wait_for(lambda: store.device(device)["status"] == "offline", f"{device} offline (its last will)",
                 timeout_s=1.5 * KEEPALIVE_S + SLACK_S)
    finally:
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGCONT)
            agent.kill()
        agent.wait(timeout=10)
        ctl.stop()
        store.close()


def test_an_idle_agent_heartbeats_and_is_not_shown_stale(
        controller_tls: MqttTls, mqtt_tls: Callable[[str], MqttTls], pki: CertificateAuthority,
        tmp_path: Path) -> None:
    """An agent with nothing to report republishes its state every heartbeat_s, so the store's stale rule
    (nothing seen for stale_after_s) catches only a device that really went quiet."""
    from edge_agent.mqtt_control import AgentControl
    from protos.mqtt import Ack

    store = FleetStore(tmp_path / "fleet.db", stale_after_s=1.5)

    def status(device: str) -> str | None:
        return next((d["status"] for d in store.fleet() if d["device_id"] == device), None)

    with EmbeddedBroker("127.0.0.1", 0, pki=pki.dir) as embedded:
        assert embedded.port is not None
        ctl = FleetController(store, "127.0.0.1", embedded.port, tls=controller_tls).start()
        devices = {"idle-beating": 0.3, "idle-silent": 3600.0}
        agents = [AgentControl(d, "127.0.0.1", embedded.port, on_command=lambda c: Ack(c.command_id, True, ""),
                               heartbeat_s=beat, flush_interval_ms=100, tls=mqtt_tls(d)).start()
                  for d, beat in devices.items()]
        try:
            for agent in agents:
                agent.publish_state(mode="split", cut="c1")
            for device in devices:
                wait_for(lambda d=device: status(d) == "online", f"{device} online")
            wait_for(lambda: status("idle-silent") == "stale", "the silent idle device shown stale", timeout_s=15.0)
            assert status("idle-beating") == "online"
        finally:
            for agent in agents:
                agent.close()
            ctl.stop()
            store.close()
