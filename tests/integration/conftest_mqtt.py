"""MQTT fixtures (a real Mosquitto per test module). Import them into a test module:

    from tests.integration.conftest_mqtt import mosquitto  # noqa: F401
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.mosquitto import Mosquitto, mosquitto_path


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A running Mosquitto on 127.0.0.1 (port in `.port`), stopped after the module."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()
