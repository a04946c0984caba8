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
