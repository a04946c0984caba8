"""Integration fixtures: a real Mosquitto per test module (`mosquitto`, plaintext: the lab's insecure mode), a
fleet store plus controller on it (`fleet`), per-device MQTT TLS files from the session CA (`mqtt_tls`; the CA
itself is tests/conftest.py's `pki`), and a Mosquitto run with the production TLS configuration
(`mosquitto_tls`). pytest finds them here; test modules name them as arguments and import nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud_tier.controller import FleetController
from cloud_tier.fleet_store import FleetStore
from cloud_tier.lab.mosquitto import Mosquitto, mosquitto_path
from cloud_tier.pki import CertificateAuthority
from protos.mqtt import MqttTls


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A running plaintext Mosquitto on 127.0.0.1 (port in `.port`), stopped after the module."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture()
def fleet(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[tuple[FleetStore, FleetController]]:
    """A fleet store and a controller subscribed to the module's Mosquitto."""
    store = FleetStore(tmp_path / "fleet.sqlite")
    ctl = FleetController(store, mosquitto.host, mosquitto.port).start()
    yield store, ctl
    ctl.stop()
    store.close()


@pytest.fixture(scope="session")
def mqtt_tls(pki: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], MqttTls]:
    """`mqtt_tls(id)`: the MQTT TLS files of device `id`, enrolled with the session CA (tests/conftest.py's
    `pki`, in the state dir) on first use."""
    root = tmp_path_factory.mktemp("devices")
    made: dict[str, MqttTls] = {}

    def get(device_id: str) -> MqttTls:
        if device_id not in made:
            folder = pki.enroll(device_id, root / device_id)
            made[device_id] = MqttTls(str(folder / "ca.pem"), str(folder / "device.pem"), str(folder / "device.key"))
        return made[device_id]

    return get


@pytest.fixture(scope="session")
def controller_tls(pki: CertificateAuthority) -> MqttTls:
    """The controller's MQTT TLS files from the session CA."""
    cert, key = pki.client_files("controller")
    return MqttTls(str(pki.ca_cert), str(cert), str(key))


@pytest.fixture(scope="module")
def mosquitto_tls(tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority) -> Iterator[Mosquitto]:
    """Mosquitto with the config `split-cloud mosquitto-config` writes (TLS, certificates, ACL, CRL)."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto-tls"), pki=pki.dir)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture()
def fleet_tls(mosquitto_tls: Mosquitto, controller_tls: MqttTls,
              tmp_path: Path) -> Iterator[tuple[FleetStore, FleetController]]:
    """A fleet store and a controller (with its certificate) subscribed to the module's TLS Mosquitto."""
    store = FleetStore(tmp_path / "fleet.sqlite")
    ctl = FleetController(store, mosquitto_tls.host, mosquitto_tls.port, tls=controller_tls).start()
    yield store, ctl
    ctl.stop()
    store.close()
