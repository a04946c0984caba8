"""The embedded broker's topic ACL: the same rules as the Mosquitto ACL file, from protos.mqtt.ACL.

The session's username is the identity the certificate check put there (cloud_tier.amqtt_auth): a device id or
"controller". A publish the ACL refuses is dropped by amqtt (never delivered), a subscription it refuses gets
the failure return code, and a message on a topic the receiver may not read is not sent to it.

Imported by amqtt itself, by dotted path, when the embedded broker starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from protos.mqtt import acl_allows

__all__ = ["TopicAclPlugin"]

log = logging.getLogger(__name__)

_ACCESS = {Action.PUBLISH: "write", Action.SUBSCRIBE: "subscribe", Action.RECEIVE: "read"}


class TopicAclPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Allow a publish, subscription or delivery only when protos.mqtt.acl_allows says so."""

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        """True when the session's identity may do `action` on `topic`."""
        access = _ACCESS.get(action) if action is not None else None
        identity = session.username if session is not None else None
        allowed = access is not None and topic is not None and acl_allows(identity, access, topic)
        if not allowed:
            log.info("embedded broker ACL: %r may not %s %r", identity, access or action, topic)
        return allowed

    @dataclass
    class Config:
        """No options."""
