"""The embedded broker's admission: who may connect, under which client id (amqtt 0.12).

Secure mode (the default, `CertificateAuthPlugin` and `CheckedBroker`):
- TLS with a client certificate required (`CERT_REQUIRED`, TLS 1.2+): a client without a certificate, or with
  one not signed by our CA, fails the handshake and never sends a CONNECT.
- At CONNECT, before amqtt looks up or deletes any session (`CheckedBroker._initialize_client_session`), the
  certificate's identity (its SAN URI, cloud_tier.pki.identity_of: a device id or "controller") must equal the
  client id, and its serial must not be on the CRL (re-read when crl.pem changes: a revoke takes effect at the
  next connect). Otherwise the CONNACK says "not authorised" and the connection is closed, so a client without
  a device's key can neither take over nor wipe that device's session.
- The session's username is set to the identity; the topic plugin (cloud_tier.amqtt_acl) decides by it.
- Sessions are never anonymous: clean_session decides whether one is kept while the client is away.

Insecure mode (`AcceptAllAuthPlugin`, loopback only unless told otherwise): every client is accepted.

Presence, in both modes (`KeepaliveBroker`, `KeepaliveHandler`): a client silent for 1.5x its keepalive
(MQTT 3.1.1, 3.1.2.10) is disconnected and its last will delivered, as Mosquitto does. amqtt 0.12 times the read
out after 1x keepalive and then does nothing (`handle_read_timeout` is a no-op), so a hung or powered-off device
stayed "online" forever.

Unacknowledged QoS 1 messages, in both modes (`KeepaliveHandler`, `KeepaliveBroker`): a message sent to a client
stays in its session until the client's PUBACK, and a client that comes back with clean_session=False gets it
again, with the DUP flag (MQTT 3.1.1, 4.4), as from Mosquitto. amqtt 0.12 dropped it from the session after 5 s
without a PUBACK, or as soon as the connection went, and never sent it again: a subscriber that acknowledges only
what it has stored (the fleet controller) lost what was in flight when it crashed. On a live connection a late
PUBACK still clears the message (nothing is resent there: MQTT 3.1.1 resends on reconnect only). Each session
stores at most `max_stored_messages` (in flight plus queued while the client is away); beyond that a new message
for it is dropped, counted (`KeepaliveBroker.overflow`, by client id) and logged, as Mosquitto's
max_queued_messages does, so a subscriber that never comes back cannot grow the broker's memory without bound.

Imported by amqtt itself, by dotted path, when the embedded broker starts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import OUTGOING, ApplicationMessage, Session
from amqtt.utils import gen_client_id

from cloud_tier.broker import MAX_STORED_MESSAGES
from cloud_tier.pki import identity_of, load_crl_serials, serial_of
from protos.mqtt import CONTROLLER, acl_allows

__all__ = ["AMQTT_TESTED", "KEEPALIVE_FACTOR", "PUBACK_WAIT_S", "AcceptAllAuthPlugin", "CertificateAuthPlugin",
           "CheckedBroker", "KeepaliveBroker", "KeepaliveHandler", "PeerCheck", "stored_messages"]

AMQTT_TESTED = "0.12."  # KeepaliveBroker overrides amqtt internals of this release line (cloud_tier.broker checks it)
KEEPALIVE_FACTOR = 1.5  # a client silent for this many keepalive periods is gone (MQTT 3.1.1, 3.1.2.10)
PUBACK_WAIT_S = 5.0  # a delivery task waits this long for the PUBACK (amqtt's); the message stays stored after it
REDELIVERY_TIMEOUT_S = 10.0  # amqtt's bound on one redelivery's flow (QoS 2 from clients waits for PUBREL)

log = logging.getLogger(__name__)


class PeerCheck:
    """Decides from a TLS connection's peer certificate who the client is, and whether it may use a client id."""

    def __init__(self, ca: str | Path, crl: str | Path) -> None:
        """`ca`: the CA certificate (its signature is checked on the CRL); `crl`: the revocation list, PEM."""
        self.ca, self.crl = Path(ca), Path(crl)
        self._lock = threading.Lock()
        self._crl_stamp: tuple[int, int] | None = None
        self._revoked: frozenset[int] = frozenset()

    def revoked(self) -> frozenset[int]:
        """The revoked serials, re-read whenever crl.pem changes (a revoke counts from the next connect)."""
        st = self.crl.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._crl_stamp:
                self._revoked = load_crl_serials(self.crl, self.ca)
                self._crl_stamp = stamp
            return self._revoked

    def refusal(self, ssl_object: Any, client_id: str | None, will_topic: str | None = None) -> tuple[str | None, str]:
        """(identity, "") when the client may connect as `client_id`, else (None, why not)."""
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None, "no client certificate"
        pem = ssl.DER_cert_to_PEM_cert(der).encode()
        who = identity_of(pem)
        if who is None or who.kind not in ("device", CONTROLLER):
            return None, "the certificate carries no device or controller identity"
        if who.kind == "device" and who.name == CONTROLLER:
            return None, f"device id {CONTROLLER!r} is reserved for the controller"
        try:
            revoked = serial_of(pem) in self.revoked()
        except Exception as exc:  # noqa: BLE001 - an unreadable CRL refuses everyone, with its cause
            return None, f"the revocation list {self.crl} cannot be read: {exc}"
        if revoked:
            return None, f"the certificate of {who.name!r} is revoked"
        if client_id != who.name:
            return None, f"client id {client_id!r} is not the certificate's identity {who.name!r}"
        if will_topic is not None and not acl_allows(who.name, "write", will_topic):
            return None, f"{who.name!r} may not publish its last will on {will_topic!r}"
        return who.name, ""


class KeepaliveHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker-side handler, with a read timeout that drops the connection.

    amqtt's reader waits `session.keep_alive` seconds for each packet (KeepaliveBroker makes that 1.5x the
    client's keepalive) and on timeout calls `handle_read_timeout`, a no-op in amqtt 0.12. Here it aborts the
    transport: the reader sees end of stream, amqtt ends the session as for a dropped connection (no DISCONNECT
    packet), and so publishes (and retains) the client's last will.
    """

    def handle_read_timeout(self) -> None:
        """The client sent nothing for 1.5x its keepalive: close its connection so that its will is delivered."""
        session = self.session
        log.warning("embedded broker: client %r sent nothing for %.1f s (1.5x its keepalive): disconnecting it%s",
                    getattr(session, "client_id", None), getattr(session, "keep_alive", 0),
                    " and publishing its last will" if getattr(session, "will_flag", False) else "")
        stream_writer = getattr(self.writer, "_writer", None)  # amqtt's StreamWriterAdapter wraps asyncio's
        transport = getattr(stream_writer, "transport", None)
        if transport is not None:
            transport.abort()  # connection_lost -> the reader gets EOF -> amqtt's abnormal-disconnect path
        elif self.reader is not None and hasattr(self.reader, "feed_eof"):
            self.reader.feed_eof()

    # Unacknowledged QoS 1 messages stay in the session (amqtt 0.12 drops them; see the module docstring).
    max_stored: int = MAX_STORED_MESSAGES  # both set by KeepaliveBroker for each connection
    on_overflow: Callable[[Session], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redeliveries: set[asyncio.Task[None]] = set()

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        """amqtt's QoS 1 flow for messages from clients; for messages to the client: store the message in the
        session (within `max_stored`), send it (DUP when sent before) and wait up to PUBACK_WAIT_S for its PUBACK.
        Only the PUBACK (`handle_puback`, even a late one) removes it; a timeout, a lost connection or a cancelled
        task leave it stored, to be sent again when the client resumes its session (amqtt's `_retry_deliveries`)."""
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
            return
        session, packet_id = self.session, app_message.packet_id
        if session is None or packet_id is None:
            raise AMQTTError("QoS 1 delivery without a session or a packet id")
        if app_message.puback_packet is not None:  # acknowledged meanwhile: nothing left to deliver
            self._forget(packet_id, app_message)
            return
        if packet_id not in session.inflight_out:
            if stored_messages(session) >= self.max_stored:
                if self.on_overflow is not None:
                    self.on_overflow(session)
                return
            session.inflight_out[packet_id] = app_message
        publish_packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        app_message.publish_packet = publish_packet  # before the write: once (partly) sent, a resend is a DUP
        waiter: asyncio.Future[PubackPacket] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            await self._send_packet(publish_packet)
            app_message.puback_packet = await asyncio.wait_for(waiter, timeout=PUBACK_WAIT_S)
        except asyncio.TimeoutError:
            log.debug("embedded broker: no PUBACK from %r for packet %d within %g s; it stays in the session",
                      session.client_id, packet_id, PUBACK_WAIT_S)
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
            if app_message.puback_packet is not None:
                self._forget(packet_id, app_message)

    async def start(self) -> None:
        """amqtt's start, with the disconnect waiter made before the reader runs, so that a client gone (or
        DISCONNECTed) while its session resumes is seen: amqtt 0.12 made a new waiter after `_retry_deliveries`,
        nobody resolved it, and the session stayed "connected" without a connection, its last will never sent."""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._disconnect_waiter = waiter
        await ProtocolHandler.start(self)  # not BrokerProtocolHandler.start: it replaces a resolved waiter
        if self._disconnect_waiter is None and waiter.done():
            self._disconnect_waiter = waiter  # wait_disconnect() returns what ended the connection

    async def _retry_deliveries(self) -> None:
        """Send again what the resumed session holds (MQTT 3.1.1, 4.4.0-1), in order, each as its own task, without
        waiting for the acknowledgements: amqtt 0.12 waited for them before the session's message loop began."""
        session = self.session
        if session is None:
            raise AMQTTError("Session is not initialized.")
        pending = [*session.inflight_in.values(), *session.inflight_out.values()]
        if pending:
            log.info("embedded broker: sending %d unacknowledged messages again to %r", len(pending),
                     session.client_id)
        for message in pending:
            task = asyncio.create_task(asyncio.wait_for(self._handle_message_flow(message), REDELIVERY_TIMEOUT_S))
            self._redeliveries.add(task)
            task.add_done_callback(self._redelivered)

    def _redelivered(self, task: asyncio.Task[None]) -> None:
        self._redeliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("embedded broker: a redelivery ended with %r (the message stays in the session)",
                      task.exception())

    async def stop(self) -> None:
        """amqtt's stop, and the redeliveries still running end too (their messages stay in the session)."""
        for task in list(self._redeliveries):
            task.cancel()
        await super().stop()

    def _forget(self, packet_id: int, message: ApplicationMessage) -> None:
        if self.session is not None and self.session.inflight_out.get(packet_id) is message:
            del self.session.inflight_out[packet_id]

    async def handle_puback(self, puback: PubackPacket) -> None:
        """The client has the message: remove it from the session, also when its delivery task stopped waiting."""
        packet_id = puback.variable_header.packet_id if puback.variable_header is not None else None
        session = self.session
        message = session.inflight_out.get(packet_id) if session is not None and packet_id is not None else None
        if packet_id is None or message is None or message.qos != QOS_1:
            await super().handle_puback(puback)
            return
        message.puback_packet = puback
        self._forget(packet_id, message)
        waiter = self._puback_waiters.get(packet_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(puback)


def stored_messages(session: Session) -> int:
    """How many messages the session holds for its client: unacknowledged, or queued while it is away."""
    return len(session.inflight_out) + session.retained_messages.qsize()


class KeepaliveBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker whose sessions time out after 1.5x the client's keepalive (KeepaliveHandler), and keep what
    their client has not acknowledged, within `max_stored_messages` each (`overflow` counts what did not fit).

    `_initialize_client_session` is amqtt 0.12's, with our handler class, an admission hook (`_admit`, which
    CheckedBroker uses to check certificates before any session is touched) and the 1.5x read timeout.
    """

    max_stored_messages = MAX_STORED_MESSAGES  # per session (cloud_tier.broker sets it)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overflow: Counter[str] = Counter()  # messages dropped because a session held max_stored_messages

    def _overflowed(self, session: Session) -> None:
        """A message for `session` found it full: count it, and say so (the first time, then every 1000th)."""
        client_id = str(session.client_id)
        self.overflow[client_id] += 1
        dropped = self.overflow[client_id]
        if dropped == 1 or dropped % 1000 == 0:
            log.warning("embedded broker: the session of %r already holds %d unacknowledged or queued messages "
                        "(max_stored_messages): a new message for it is dropped (%d so far)", client_id,
                        self.max_stored_messages, dropped)

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Session) -> None:
        """amqtt's queueing of a message for a persistent session whose client is away, within the cap."""
        if stored_messages(target_session) >= self.max_stored_messages:
            self._overflowed(target_session)
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _admit(self, client_session: Session, writer: Any, remote_address: str, remote_port: int) -> None:
        """Refuse the client (raise MQTTError after answering its CONNECT) or let it through; here: everyone."""

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, client_session = await KeepaliveHandler.init_from_connect(reader, writer, self.plugins_manager)
        handler.max_stored, handler.on_overflow = self.max_stored_messages, self._overflowed
        await self._admit(client_session, writer, remote_address, remote_port)
        # From here on: amqtt 0.12's Broker._initialize_client_session, unchanged but for the last step.
        if client_session.clean_session:
            if client_session.client_id is not None and client_session.client_id != "":
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            existing, _ = self._sessions[client_session.client_id]
            existing.will_flag = client_session.will_flag
            existing.will_message = client_session.will_message
            existing.will_topic = client_session.will_topic
            existing.will_qos = client_session.will_qos
            existing.keep_alive = client_session.keep_alive
            existing.username = client_session.username
            existing.password = client_session.password
            existing.ssl_object = client_session.ssl_object
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0
        # amqtt reads with a timeout of `keep_alive` seconds: make it the 1.5x of MQTT 3.1.1 (0 stays "none").
        delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0:
            client_session.keep_alive = KEEPALIVE_FACTOR * client_session.keep_alive + (
                delay if isinstance(delay, int) else 0)
        return handler, client_session


class CheckedBroker(KeepaliveBroker):
    """amqtt's Broker with client certificates required and the identity checked before any session is touched.

    amqtt 0.12 deletes (clean session) or adopts (persistent session) the stored session of a client id as soon
    as it reads the CONNECT, and only then asks the auth plugins: a stranger could wipe or kick a device's session
    by borrowing its id. `_admit` runs the peer check before that step (KeepaliveBroker._initialize_client_session).

    amqtt 0.12 also sends a connecting client the retained messages matching *every* client's subscription
    filters, without asking the topic plugins: `_publish_retained_messages_for_subscription` here sends a
    retained message only when the ACL lets the session read its topic.
    """

    peer_check: PeerCheck | None = None  # set by cloud_tier.broker before start()

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        ctx = Broker._create_ssl_context(listener)
        ctx.verify_mode = ssl.CERT_REQUIRED  # amqtt sets CERT_OPTIONAL
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def _admit(self, client_session: Session, writer: Any, remote_address: str, remote_port: int) -> None:
        """The peer check, before amqtt looks up or deletes any session: refuse with "not authorised", or name
        the session after the certificate's identity."""
        check = self.peer_check
        if check is None:
            raise MQTTError("CheckedBroker.peer_check is not set")
        will = client_session.will_topic if client_session.will_flag else None
        identity, why = check.refusal(client_session.ssl_object, client_session.client_id, will)
        if identity is None:
            log.warning("embedded broker refused %s:%s (client id %r): %s", remote_address, remote_port,
                        client_session.client_id, why)
            try:
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await writer.close()
            except OSError:  # the refused client may already be gone (BrokenPipeError): it is refused either way
                pass
            raise MQTTError(f"refused: {why}")
        client_session.username = identity

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            # acl_allows directly (cloud_tier.amqtt_acl's rule), not the awaited plugin call: amqtt iterates over
            # its subscriptions around this call, and yielding here lets another client change them meanwhile.
            if self._matches(topic, topic_filter) and acl_allows(session.username, "read", topic):
                tasks.append(asyncio.ensure_future(
                    handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
        if tasks:
            await asyncio.wait(tasks)


class CertificateAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Admit a client only with a valid, unrevoked certificate of ours whose identity is its client id."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._check = PeerCheck(self.config.ca, self.config.crl)

    async def authenticate(self, *, session: Session) -> bool:
        """Check the peer certificate again (the CRL may have changed) and mark the session named."""
        identity, why = self._check.refusal(session.ssl_object, session.client_id)
        if identity is None:
            log.warning("embedded broker refused client %r: %s", session.client_id, why)
            return False
        session.username = identity
        session.is_anonymous = False
        return True

    @dataclass
    class Config:
        """The CA certificate and the revocation list (PEM paths)."""

        ca: str = ""
        crl: str = ""


class AcceptAllAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Insecure mode: accept every client; persistent sessions (clean_session=False) are kept while it is away.

    amqtt's AnonymousAuthPlugin marks every client anonymous, and amqtt keeps neither the session nor the QoS 1
    messages of an anonymous client while it is away, whatever its clean_session flag says.
    """

    async def authenticate(self, *, session: Session) -> bool:
        """Let the client in, as a named (not anonymous) session."""
        session.is_anonymous = False
        return True

    @dataclass
    class Config:
        """No options."""
