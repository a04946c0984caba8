"""The embedded broker's authentication: every client is accepted and none is treated as anonymous.

amqtt's AnonymousAuthPlugin marks every client it lets in as anonymous, and amqtt keeps neither the session
nor the QoS 1 messages of an anonymous client while it is away, whatever its clean_session flag says. So an
agent's persistent session lost the commands sent while it was offline, and the controller's lost the fleet's
telemetry. With this plugin, clean_session decides, as MQTT 3.1.1 and Mosquitto have it. The broker listens
on loopback unless told otherwise (cloud_tier.broker), and it checks no credentials.

Imported by amqtt itself, by dotted path, when the embedded broker starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


class AcceptAllAuthPlugin(BaseAuthPlugin):
    """Accept every client; persistent sessions (clean_session=False) are kept while the client is away."""

    async def authenticate(self, *, session: Session) -> bool:
        """Let the client in, as a named (not anonymous) session."""
        session.is_anonymous = False
        return True

    @dataclass
    class Config:
        """No options."""
