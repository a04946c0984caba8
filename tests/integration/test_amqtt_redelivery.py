"""The embedded amqtt broker keeps the QoS 1 messages a persistent session has not acknowledged and delivers them
again, with the DUP flag, when the client resumes the session (MQTT 3.1.1, 4.4), as Mosquitto does; a session
holds at most `max_stored_messages` (cloud_tier.amqtt_auth). Raw paho clients with manual acknowledgement, in
both modes: plaintext (KeepaliveBroker) and the default TLS one (CheckedBroker, the subscriber as the controller).
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud_tier import amqtt_auth
from cloud_tier.broker import BrokerStartError, EmbeddedBroker
from cloud_tier.pki import CertificateAuthority
from protos.mqtt import CONTROLLER, TELEMETRY, MqttTls, device_topic, fleet_filter
from tests import polling

DEADLINE_S = 20.0
DEVICE = "redeliver-dev"
TOPIC = device_topic(DEVICE, TELEMETRY)  # what the device publishes; the subscriber takes every device's


class Subscriber:
    """A paho client with a persistent session that acknowledges only when told to."""

    def __init__(self, port: int, client_id: str, *, subscribe: bool = True, tls: MqttTls | None = None) -> None:
        self.got: queue.Queue[mqtt.MQTTMessage] = queue.Queue(maxsize=1000)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                                  protocol=mqtt.MQTTv311, manual_ack=True)
        self.client.on_message = lambda _c, _u, msg: self.got.put_nowait(msg)
        subscribed = queue.Queue[int](maxsize=1)
        self.client.on_subscribe = lambda *_a: subscribed.put_nowait(1)
        connected = queue.Queue[Any](maxsize=1)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: connected.put_nowait(rc)
        if tls is not None:
            tls.apply(self.client)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert connected.get(timeout=DEADLINE_S) == 0
        if subscribe:
            self.client.subscribe(fleet_filter(TELEMETRY), qos=1)
            subscribed.get(timeout=DEADLINE_S)

    def receive(self, n: int) -> list[mqtt.MQTTMessage]:
        return [self.got.get(timeout=DEADLINE_S) for _ in range(n)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, payloads: list[bytes], tls: MqttTls | None = None) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE if tls else f"pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv311)
    if tls is not None:
        tls.apply(client)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        for payload in payloads:
            info = client.publish(TOPIC, payload, qos=1)
            info.wait_for_publish(DEADLINE_S)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def session_of(broker: EmbeddedBroker, client_id: str) -> Any:
    return broker._broker._sessions[client_id][0]


def all_gone(broker: EmbeddedBroker) -> bool:
    """No client connected any more (stopping the broker under a connected one leaves amqtt's tasks behind)."""
    return all(session.transitions.state != "connected" for session, _ in list(broker._broker._sessions.values()))


def deliveries_done(broker: EmbeddedBroker) -> bool:
    return all(task.done() for task in broker._broker._tasks_queue)


@dataclass
class Setup:
    """A started embedded broker, and who subscribes and publishes on it (with certificates in TLS mode)."""

    broker: EmbeddedBroker
    port: int
    sub_id: str
    sub_tls: MqttTls | None = None
    pub_tls: MqttTls | None = None

    def subscriber(self, *, subscribe: bool = True) -> Subscriber:
        return Subscriber(self.port, self.sub_id, subscribe=subscribe, tls=self.sub_tls)

    def publish(self, payloads: list[bytes]) -> None:
        publish(self.port, payloads, self.pub_tls)

    def stored(self) -> int:
        return len(session_of(self.broker, self.sub_id).inflight_out)


@pytest.fixture(params=["plaintext", "tls"])
def setup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    monkeypatch.setattr(amqtt_auth, "PUBACK_WAIT_S", 0.2)  # amqtt's 5 s: the same path, sooner
    if request.param == "plaintext":
        embedded = EmbeddedBroker("127.0.0.1", 0, insecure=True)
        made = Setup(embedded, embedded.start(), f"sub-{uuid.uuid4().hex[:8]}")
    else:
        pki: CertificateAuthority = request.getfixturevalue("pki")
        mqtt_tls: Callable[[str], MqttTls] = request.getfixturevalue("mqtt_tls")
        embedded = EmbeddedBroker("127.0.0.1", 0, pki=pki.dir)
        made = Setup(embedded, embedded.start(), CONTROLLER, request.getfixturevalue("controller_tls"),
                     mqtt_tls(DEVICE))
    try:
        yield made
        polling.wait_for(lambda: all_gone(embedded), "every client gone", DEADLINE_S)
    finally:
        embedded.stop()


def test_unacknowledged_messages_outlive_the_puback_wait_and_come_back_with_dup_on_resume(setup: Setup) -> None:
    broker = setup.broker
    sub = setup.subscriber()
    payloads = [f"m{i}".encode() for i in range(5)]
    setup.publish(payloads)
    first = sub.receive(5)
    assert [m.payload for m in first] == payloads and not any(m.dup for m in first)
    # The broker's delivery tasks stop waiting for the PUBACK (0.2 s here); the messages stay in the session.
    polling.wait_for(lambda: deliveries_done(broker), "the delivery tasks give up waiting", DEADLINE_S)
    assert setup.stored() == 5
    # A PUBACK after the wait still counts: that one message is done.
    sub.client.ack(first[0].mid, 1)
    polling.wait_for(lambda: setup.stored() == 4, "the late PUBACK", DEADLINE_S)
    sub.close()

    again = setup.subscriber(subscribe=False)  # the session resumes, its subscription too
    try:
        second = again.receive(4)
        assert [m.payload for m in second] == payloads[1:]  # in their order, the acknowledged one not again
        assert all(m.dup for m in second)
        for m in second:
            again.client.ack(m.mid, 1)
        polling.wait_for(lambda: setup.stored() == 0, "every PUBACK", DEADLINE_S)
    finally:
        again.close()

    third = setup.subscriber(subscribe=False)
    try:
        setup.publish([b"barrier"])  # delivered behind anything redelivered: nothing comes before it
        (barrier,) = third.receive(1)
        assert barrier.payload == b"barrier" and not barrier.dup
        third.client.ack(barrier.mid, 1)
    finally:
        third.close()
    assert broker.overflow() == {}


def test_a_controller_gone_mid_delivery_gets_its_messages_again(setup: Setup) -> None:
    """The connection drops before any PUBACK (no DISCONNECT: a crash); the session keeps the messages."""
    sub = setup.subscriber()
    setup.publish([b"a", b"b", b"c"])
    assert [m.payload for m in sub.receive(3)] == [b"a", b"b", b"c"]
    sock = sub.client.socket()
    assert sock is not None
    sub.client.loop_stop()
    sock.close()  # as a killed process's socket: the broker reads end of stream, its delivery tasks are cancelled
    polling.wait_for(lambda: session_of(setup.broker, setup.sub_id).transitions.state == "disconnected",
                     "the broker notices the crash", DEADLINE_S)
    assert setup.stored() == 3
    back = setup.subscriber(subscribe=False)
    try:
        got = back.receive(3)
        assert [m.payload for m in got] == [b"a", b"b", b"c"] and all(m.dup for m in got)
    finally:
        back.close()


def test_a_session_holds_at_most_max_stored_messages_and_counts_the_rest() -> None:
    with EmbeddedBroker("127.0.0.1", 0, insecure=True, max_stored_messages=3) as broker:
        assert broker.port is not None
        # Connected and never acknowledging: three in flight, the rest dropped and counted.
        live = Subscriber(broker.port, "sub-live")
        publish(broker.port, [f"l{i}".encode() for i in range(5)])
        assert len(live.receive(3)) == 3
        polling.wait_for(lambda: broker.overflow().get("sub-live") == 2, "two dropped", DEADLINE_S)
        assert live.got.empty()
        live.close()
        # Away: queued for the session, within the same cap.
        away = Subscriber(broker.port, "sub-away")
        away.close()
        polling.wait_for(lambda: session_of(broker, "sub-away").transitions.state == "disconnected", "gone",
                         DEADLINE_S)
        publish(broker.port, [f"q{i}".encode() for i in range(5)])
        back = Subscriber(broker.port, "sub-away", subscribe=False)
        try:
            assert [m.payload for m in back.receive(3)] == [b"q0", b"q1", b"q2"]
        finally:
            back.close()
        assert broker.overflow() == {"sub-live": 2 + 5, "sub-away": 2}  # sub-live was away for the second burst
        polling.wait_for(lambda: all_gone(broker), "every client gone", DEADLINE_S)


def test_max_stored_messages_is_checked() -> None:
    for bad in (0, 70_000, 2.5, True):
        with pytest.raises(BrokerStartError, match="max_stored_messages"):
            EmbeddedBroker("127.0.0.1", 0, insecure=True, max_stored_messages=bad)  # type: ignore[arg-type]
