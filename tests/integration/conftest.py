"""Integration fixtures: a real Mosquitto per test module (`mosquitto`) and a fleet store plus controller on it
(`fleet`). pytest finds them here; test modules name them as arguments and import nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_tier.controller import FleetController
from cloud_tier.fleet_store import FleetStore
from cloud_tier.lab.mosquitto import Mosquitto, mosquitto_path


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A running Mosquitto on 127.0.0.1 (port in `.port`), stopped after the module."""
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
