"""MQTT brokers: the embedded amqtt broker (zero setup) and the Mosquitto configuration for production.

The embedded broker is secure by default: a TLS listener that requires a client certificate from the
deployment's CA (`pki`, made by `split-cloud ca init`), admits a client only when the certificate is not revoked
and its identity is the client id (cloud_tier.amqtt_auth), and applies the topic ACL of protos.mqtt
(cloud_tier.amqtt_acl). `insecure=True` is plaintext with every client accepted, for loopback experiments
only (elsewhere only with `i_know_insecure`), and says so in a warning line. A client with clean_session=False
keeps its session and its QoS 1 messages while it is away, and what it had not acknowledged is delivered again
(DUP) when it comes back, at most `max_stored_messages` per session (beyond: dropped, counted in `overflow()`
and logged). A client silent for 1.5x its keepalive is
disconnected and its last will delivered (cloud_tier.amqtt_auth.KeepaliveBroker), as Mosquitto does. amqtt is
2-3x slower than Mosquitto and MQTT 3.1.1 only: use Mosquitto in production, configured by
`write_mosquitto_config` (`split-cloud mosquitto-config`).
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from cloud_tier.config import address_in_use, bind_refused
from cloud_tier.loopthread import LoopThread
from cloud_tier.pki import write_private
from models.extras import require
from protos.mqtt import insecure_mqtt, mosquitto_acl

__all__ = ["EmbeddedBroker", "BrokerStartError", "MAX_STORED_MESSAGES", "write_mosquitto_config"]

log = logging.getLogger(__name__)

MAX_STORED_MESSAGES = 10_000  # per session: QoS 1 messages unacknowledged, or queued while its client is away


class BrokerStartError(RuntimeError):
    """The embedded broker did not start."""


def _no_startup_traceback(record: logging.LogRecord) -> bool:
    """amqtt logs its failed start with a traceback before raising; EmbeddedBroker.start says it in one line."""
    return record.getMessage() != "Broker startup failed"


class EmbeddedBroker:
    """An amqtt broker running on its own event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, pki: str | Path | None = None,
                 insecure: bool = False, i_know_insecure: bool = False, start_timeout_s: float = 10.0,
                 max_stored_messages: int = MAX_STORED_MESSAGES) -> None:
        """Configure; port 0 lets the OS choose (the chosen port is returned by start()).

        `pki`: the CA folder (cloud_tier.pki: ca.pem, server.pem/.key, crl.pem), required unless `insecure`.
        `max_stored_messages`: per client session, the QoS 1 messages kept unacknowledged or queued while the
        client is away (1..60000: packet ids are 16 bits); a message beyond it is dropped, counted and logged.
        """
        if isinstance(max_stored_messages, bool) or not isinstance(max_stored_messages, int) \
                or not 1 <= max_stored_messages <= 60_000:
            raise BrokerStartError(f"max_stored_messages: expected an integer from 1 to 60000, got "
                                   f"{max_stored_messages!r}")
        self.max_stored_messages = max_stored_messages
        if pki is None and not insecure:
            raise BrokerStartError("the embedded MQTT broker needs the CA folder (pki; `split-cloud ca init`) "
                                   "for its TLS listener, or the explicit insecure mode")
        if insecure:
            try:
                insecure_mqtt(host, "the embedded MQTT broker", i_know_insecure=i_know_insecure, log=log)
            except ValueError as exc:
                raise BrokerStartError(str(exc)) from exc
        self.pki = None if insecure or pki is None else Path(pki)
        self.host, self._requested_port = host, port
        self.port: int | None = None
        self._timeout = start_timeout_s
        self._runner = LoopThread("amqtt-broker")
        self._broker: Any = None

    def _config(self, port: int) -> dict[str, Any]:
        # Only our plugins: no $SYS publisher and no per-packet logging (both cost throughput).
        if self.pki is None:
            return {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}"}},
                "plugins": {"cloud_tier.amqtt_auth.AcceptAllAuthPlugin": {}},
            }
        pki = self.pki
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}", "ssl": True,
                                      "cafile": str(pki / "ca.pem"), "certfile": str(pki / "server.pem"),
                                      "keyfile": str(pki / "server.key")}},
            "plugins": {
                "cloud_tier.amqtt_auth.CertificateAuthPlugin": {"ca": str(pki / "ca.pem"),
                                                                "crl": str(pki / "crl.pem")},
                "cloud_tier.amqtt_acl.TopicAclPlugin": {"ca": str(pki / "ca.pem"), "crl": str(pki / "crl.pem")},
            },
        }

    def start(self) -> int:
        """Start the broker thread and return the TCP port it listens on."""
        if self._runner.running:
            raise BrokerStartError("embedded broker already started")
        async def boot() -> None:
            from cloud_tier.amqtt_auth import AMQTT_TESTED, CheckedBroker, KeepaliveBroker, PeerCheck

            found = metadata.version("amqtt")
            if not found.startswith(AMQTT_TESTED):
                # KeepaliveBroker and CheckedBroker replace amqtt internals that decide who gets a session and when
                # a silent one ends: refuse to run them on a version they were not checked against.
                raise BrokerStartError(f"the embedded broker's session checks are written for amqtt "
                                       f"{AMQTT_TESTED}x, found {found}: pip install 'amqtt=={AMQTT_TESTED}*'")
            port = self._requested_port
            if self.pki is None:
                self._broker = KeepaliveBroker(self._config(port))
                self._broker.max_stored_messages = self.max_stored_messages
            else:
                for name in ("ca.pem", "server.pem", "server.key", "crl.pem"):
                    if not (self.pki / name).is_file():
                        raise BrokerStartError(f"{self.pki} has no {name}: expected a CA folder made by "
                                               "`split-cloud ca init`")
                self._broker = CheckedBroker(self._config(port))
                self._broker.max_stored_messages = self.max_stored_messages
                self._broker.peer_check = PeerCheck(self.pki / "ca.pem", self.pki / "crl.pem")
            await self._broker.start()
            self.port = self._bound_port() or port
            if not self.port:
                raise BrokerStartError("amqtt did not report the port it bound (its internals changed?); "
                                       "pass an explicit port")

        require("amqtt.broker", "cloud")
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(_no_startup_traceback)  # a failed start is reported below, in one line
        try:
            self._runner.start(boot, self._timeout)
        except TimeoutError as exc:
            raise BrokerStartError(f"embedded MQTT broker on {self.host} did not start within "
                                   f"{self._timeout} s") from exc
        except BrokerStartError:
            raise
        except Exception as exc:  # noqa: BLE001 - amqtt's own errors, one clear line
            if address_in_use(exc):
                raise BrokerStartError(bind_refused("the embedded MQTT broker", self.host, self._requested_port,
                                                    "--broker-port")) from exc
            raise BrokerStartError(f"embedded MQTT broker on {self.host}:{self._requested_port} failed: {exc}") from exc
        finally:
            amqtt_log.removeFilter(_no_startup_traceback)
        assert self.port is not None
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)
        return self.port

    def overflow(self) -> dict[str, int]:
        """Messages dropped because their session already held `max_stored_messages`, by client id."""
        broker = self._broker
        return dict(broker.overflow) if broker is not None else {}

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


def write_mosquitto_config(out: str | Path, pki: str | Path, *, port: int = 8883, host: str = "127.0.0.1",
                           extra: str = "", user: str | None = "mosquitto") -> Path:
    """Write `out`/mosquitto.conf (a TLS listener with client certificates required), `out`/acl (made from
    protos.mqtt.ACL) and `out`/server.key; return the config's path. `pki` is the CA folder (`split-cloud ca init`).

    Mosquitto started as root drops to its own user (`user`, Debian's "mosquitto"), who may read the CA folder's
    public files by name (ca.pem, server.pem, crl.pem: the CRL stays the one `split-cloud revoke` updates) but
    not its keys: the server key is copied into `out` (0600) and, when this runs as root and `user` exists,
    the key and the ACL are given to that user. Re-run this after re-issuing the server certificate.

    Mosquitto reads the CRL when it starts (and on SIGHUP, which also re-reads the ACL): after
    `split-cloud revoke`, send it SIGHUP (`systemctl reload mosquitto`) for the revocation to take effect.
    `use_identity_as_username` makes the username the certificate's CN (the device id, or "controller");
    `use_username_as_clientid` then makes it the client id too, so nobody can take over a session under
    another identity's client id.
    """
    out, pki = Path(out).resolve(), Path(pki).resolve()
    for name in ("ca.pem", "server.pem", "server.key", "crl.pem"):
        if not (pki / name).is_file():
            raise FileNotFoundError(f"{pki / name} is missing: expected a CA folder made by `split-cloud ca init`")
    out.mkdir(parents=True, exist_ok=True)
    acl = out / "acl"
    acl.write_text(mosquitto_acl())
    os.chmod(acl, 0o640)
    key = out / "server.key"
    write_private(key, (pki / "server.key").read_bytes())
    owner = _broker_user(user)
    if owner is not None:
        for path in (out, acl, key):
            os.chown(path, owner[0], owner[1])
    conf = out / "mosquitto.conf"
    conf.write_text(
        "# splitinfer MQTT broker: made by `split-cloud mosquitto-config`. Run: mosquitto -c " + str(conf) + "\n"
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"acl_file {acl}\n"
        "set_tcp_nodelay true\n"
        f"listener {port} {host}\n"
        "protocol mqtt\n"
        f"cafile {pki / 'ca.pem'}\n"
        f"certfile {pki / 'server.pem'}\n"
        f"keyfile {key}\n"
        f"crlfile {pki / 'crl.pem'}\n"
        "tls_version tlsv1.2\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "use_username_as_clientid true\n"
        + extra
    )
    return conf


def _broker_user(user: str | None) -> tuple[int, int] | None:
    """(uid, gid) of `user` when this process is root and the user exists, else None (nothing to hand over)."""
    if user is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid
