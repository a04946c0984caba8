"""Embedded MQTT broker (amqtt) for zero-setup deployments and tests.

amqtt binds 0.0.0.0 and allows anonymous clients by default, so it is bound to 127.0.0.1 here unless the
caller asks otherwise. Clients are not authenticated; a client with clean_session=False keeps its session and
its QoS 1 messages while it is away (cloud_tier.amqtt_auth). It is 2-3x slower than Mosquitto and MQTT
3.1.1 only: use Mosquitto in production.
"""

from __future__ import annotations

import logging
from typing import Any

from cloud_tier.loopthread import LoopThread
from models.extras import require

__all__ = ["EmbeddedBroker", "BrokerStartError"]

log = logging.getLogger(__name__)


class BrokerStartError(RuntimeError):
    """The embedded broker did not start."""


class EmbeddedBroker:
    """An amqtt broker running on its own event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, start_timeout_s: float = 10.0) -> None:
        """Configure; port 0 lets the OS choose (the chosen port is returned by start())."""
        self.host, self._requested_port = host, port
        self.port: int | None = None
        self._timeout = start_timeout_s
        self._runner = LoopThread("amqtt-broker")
        self._broker: Any = None

    def _config(self, port: int) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}"}},
            # Only our auth plugin (anyone in; persistent sessions kept, see cloud_tier.amqtt_auth): no $SYS
            # publisher and no per-packet logging (both cost throughput).
            "plugins": {"cloud_tier.amqtt_auth.AcceptAllAuthPlugin": {}},
        }

    def start(self) -> int:
        """Start the broker thread and return the TCP port it listens on."""
        if self._runner.running:
            raise BrokerStartError("embedded broker already started")
        broker_mod = require("amqtt.broker", "cloud")

        async def boot() -> None:
            port = self._requested_port
            self._broker = broker_mod.Broker(self._config(port))
            await self._broker.start()
            self.port = self._bound_port() or port
            if not self.port:
                raise BrokerStartError("amqtt did not report the port it bound (its internals changed?); "
                                       "pass an explicit port")

        try:
            self._runner.start(boot, self._timeout)
        except TimeoutError as exc:
            raise BrokerStartError(f"embedded MQTT broker on {self.host} did not start within "
                                   f"{self._timeout} s") from exc
        except BrokerStartError:
            raise
        except Exception as exc:  # noqa: BLE001 - amqtt's own errors, one clear line
            raise BrokerStartError(f"embedded MQTT broker on {self.host}:{self._requested_port} failed: {exc}") from exc
        assert self.port is not None
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)
        return self.port

    def _bound_port(self) -> int | None:
        # amqtt keeps its asyncio servers in Broker._servers; read the real port when port 0 was asked for.
        servers = getattr(self._broker, "_servers", {})
        server = servers.get("default")
        sockets = getattr(getattr(server, "instance", None), "sockets", None) or ()
        for sock in sockets:
            return int(sock.getsockname()[1])
        return None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the broker down and join its thread."""
        broker = self._broker
        self._runner.stop(broker.shutdown if broker is not None else None, timeout_s)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
