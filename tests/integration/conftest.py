"""Integration fixtures: a real Mosquitto per test module (`mosquitto`, plaintext: the lab's insecure mode), a
fleet store plus controller on it (`fleet`), per-device MQTT TLS files from the session CA (`mqtt_tls`; the CA
itself is tests/conftest.py's `pki`), and a Mosquitto run with the production TLS configuration
(`mosquitto_tls`), and one local Ray cluster for the session's Ray tests (`ray_cluster`, stopped after the last
test that uses it). pytest finds them here; test modules name them as arguments and import nothing.
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


# The Ray cluster's stop, and the node id of the last test that uses it (set at collection): it stops after that
# test instead of at the end of the session, so the tests after it run without Ray's processes beside them.
_ray: dict[str, Callable[[], None] | str | None] = {"stop": None, "last": None}


@pytest.hookimpl(trylast=True)  # after -k/-m deselected: the last test that runs
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users = [item.nodeid for item in items if "ray_cluster" in getattr(item, "fixturenames", ())]
    _ray["last"] = users[-1] if users else None


@pytest.hookimpl(trylast=True)  # after the test's own fixtures (a module's Serve apps) are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    stop = _ray["stop"]
    if item.nodeid == _ray["last"] and callable(stop):
        stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray cluster for every Ray test of the session (its address): on loopback only, 2 CPUs, no
    dashboard, token auth pinned off (since Ray 2.59 a new local cluster turns it on). Tests using it leave it as
    they found it (a module that deploys Serve apps shuts Serve down after itself)."""
    ray = pytest.importorskip("ray", reason='the [ray] extra is not installed (pip install "splitinfer[ray]")')
    from cloud_tier.rayinit import LOOPBACK_ENV, loopback_only

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")  # loopback only; pinned, else 2.59+ turns token auth on
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setenv(LOOPBACK_ENV, "0")
    loopback_only(ray)  # else Ray listens on every interface
    try:
        info = ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
                        log_to_driver=False)
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    except BaseException:
        mp.undo()
        raise

    def stop() -> None:
        _ray["stop"] = None
        ray.shutdown()
        mp.undo()

    _ray["stop"] = stop
    yield str(info.address_info["address"])
    if _ray["stop"] is not None:
        stop()
