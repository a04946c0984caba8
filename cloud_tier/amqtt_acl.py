"""The embedded broker's topic ACL: the same rules as the Mosquitto ACL file, from protos.mqtt.ACL.

The session's username is the identity the certificate check put there (cloud_tier.amqtt_auth): a device id or
"controller". A publish the ACL refuses is dropped by amqtt (never delivered), a subscription it refuses gets
the failure return code, and a message on a topic the receiver may not read is not sent to it. A session whose
certificate has been revoked since it connected may do nothing at all: `split-cloud revoke` cuts a connected
device off at its next message (the CRL is re-read when the file changes), not only at its next connect.

Imported by amqtt itself, by dotted path, when the embedded broker starts.
"""

from __future__ import annotations

import logging
import ssl
import weakref
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from cloud_tier.amqtt_auth import PeerCheck
from cloud_tier.pki import serial_of
from protos.mqtt import acl_allows

__all__ = ["TopicAclPlugin"]

log = logging.getLogger(__name__)

_ACCESS = {Action.PUBLISH: "write", Action.SUBSCRIBE: "subscribe", Action.RECEIVE: "read"}


class TopicAclPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Allow a publish, subscription or delivery only when protos.mqtt.acl_allows says so, and never to a
    session whose certificate is revoked."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._check = PeerCheck(self.config.ca, self.config.crl) if self.config.crl else None
        # A connection's TLS object -> its certificate's serial, computed once; dropped with the connection.
        self._serials: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        """True when the session's identity may do `action` on `topic`."""
        access = _ACCESS.get(action) if action is not None else None
        identity = session.username if session is not None else None
        allowed = access is not None and topic is not None and acl_allows(identity, access, topic)
        if not allowed:
            log.info("embedded broker ACL: %r may not %s %r", identity, access or action, topic)
        elif self._revoked(session):
            log.warning("embedded broker: the certificate of %r is revoked: %s %r refused", identity, access, topic)
            allowed = False
        return allowed

    def _revoked(self, session: Session | None) -> bool:
        ssl_object = getattr(session, "ssl_object", None)
        if self._check is None or ssl_object is None:
            return False
        serial = self._serials.get(ssl_object)
        if serial is None:
            der = ssl_object.getpeercert(binary_form=True)
            if not der:
                return True  # the certificate check admitted it with one: without it, nothing is allowed
            serial = self._serials[ssl_object] = serial_of(ssl.DER_cert_to_PEM_cert(der).encode())
        try:
            return serial in self._check.revoked()
        except Exception:  # noqa: BLE001 - an unreadable CRL refuses everyone, as at connect
            log.exception("embedded broker: the revocation list cannot be read")
            return True

    @dataclass
    class Config:
        """The CA certificate and the revocation list (PEM paths); empty: no revocation check per message."""

        ca: str = ""
        crl: str = ""
