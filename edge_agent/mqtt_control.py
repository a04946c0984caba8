"""MQTT control plane of an edge agent: presence, commands with acks, batched telemetry.

paho-mqtt 2.x with the VERSION2 callback API pinned. A persistent session (clean_session=False and a fixed
client id) makes the broker keep QoS 1 commands sent while the agent is offline and deliver them on
reconnect; commands are deduplicated by id, so a redelivered command is applied once. A retained last
will marks the device `offline` when it dies without saying goodbye.

The client id is the device id, which is also its certificate's identity: with `tls` (mutual TLS, the broker's
name checked) the broker admits the session only for the holder of that device's key, so nobody else can
take it over. Without `tls` the connection is plaintext: loopback only unless `i_know_insecure`, with a
warning line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from models.extras import require
from protos.mqtt import (
    ACK,
    CMD,
    STATE,
    TELEMETRY,
    Ack,
    Command,
    DeviceState,
    MqttSchemaError,
    MqttTls,
    TelemetryBatch,
    TelemetryRecord,
    check_device_id,
    device_topic,
    insecure_mqtt,
)

__all__ = ["AgentControl", "client_id_for"]

log = logging.getLogger(__name__)

_SEEN_COMMANDS = 1024  # how many command ids are remembered for dedupe


def client_id_for(device_id: str) -> str:
    """The fixed MQTT client id of a device's agent: the device id, its certificate's identity (the broker keeps
    its session under it, and with TLS admits only the holder of the device's key under it)."""
    return check_device_id(device_id)


def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    # paho never sets TCP_NODELAY: without it a QoS 1 round trip costs ~88 ms (Nagle + delayed ACK).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # e.g. a websocket transport wrapper
        log.debug("TCP_NODELAY not set on %r: %s", sock, exc)


class AgentControl:
    """One device's MQTT session: publishes state and telemetry, applies commands once each."""

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        *,
        on_command: Callable[[Command], Ack],
        telemetry_bound: int = 10_000,
        flush_interval_ms: int = 500,
        max_batch: int = 1_000,
        keepalive_s: int = 30,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 30,
        max_queued_messages: int = 1_000,
        label: str | None = None,
        heartbeat_s: float = 5.0,
        client_id: str | None = None,
        tls: MqttTls | None = None,
        i_know_insecure: bool = False,
    ) -> None:
        """Configure (nothing is connected until start()); `tls`: this device's certificate, key and the CA."""
        mqtt = require("paho.mqtt.client", "edge")
        self.device_id = check_device_id(device_id)
        if tls is None:
            insecure_mqtt(host, f"device {device_id!r}", i_know_insecure=i_know_insecure, log=log)
        if telemetry_bound < 1 or max_batch < 1 or flush_interval_ms < 1:
            raise ValueError("telemetry_bound, max_batch and flush_interval_ms must be >= 1")
        self.host, self.port = host, port
        self._on_command = on_command
        self._bound, self._max_batch = telemetry_bound, max_batch
        self._flush_s = flush_interval_ms / 1000.0
        self._heartbeat_s = heartbeat_s
        self._last_sent = time.monotonic()  # the last state or telemetry handed to paho
        self._keepalive = keepalive_s
        self._label = label
        self._lock = threading.Lock()
        self._buffer: collections.deque[TelemetryRecord] = collections.deque()
        self._dropped = 0  # records refused since the last published batch
        self.dropped_total = 0
        self.bad_commands = 0
        self._seen: collections.OrderedDict[str, Ack] = collections.OrderedDict()
        self._state = DeviceState(status="online", label=label)
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # the broker confirmed the cmd subscription
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._queue_full = mqtt.MQTT_ERR_QUEUE_SIZE

        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or client_id_for(device_id),
            clean_session=False,
            protocol=mqtt.MQTTv311,  # the embedded amqtt broker speaks 3.1.1 only
        )
        if tls is not None:
            tls.apply(self._client)
        self._client.will_set(device_topic(device_id, STATE), self._offline_json(), qos=1, retain=True)
        self._client.reconnect_delay_set(min_delay=reconnect_min_s, max_delay=reconnect_max_s)
        self._client.max_queued_messages_set(max_queued_messages)
        self._client.max_inflight_messages_set(100)
        self._client.on_socket_open = _nodelay
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_connect_fail = self._handle_connect_fail
        self._client.on_subscribe = self._handle_subscribe
        self._client.message_callback_add(device_topic(device_id, CMD), self._handle_command)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, wait_s: float | None = 10.0) -> AgentControl:
        """Connect in the background (bounded reconnect backoff); optionally wait until commands can arrive."""
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        self._flusher = threading.Thread(target=self._flush_loop, name=f"telemetry-{self.device_id}", daemon=True)
        self._flusher.start()
        if wait_s is not None and not self._subscribed.wait(wait_s):
            self.close(timeout_s=1.0)
            raise TimeoutError(f"MQTT broker {self.host}:{self.port} did not accept device {self.device_id!r} "
                               f"within {wait_s} s")
        return self

    @property
    def connected(self) -> bool:
        """Whether the session is currently up."""
        return self._connected.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until connected and subscribed to commands, or `timeout_s` passes; return whether ready."""
        return self._subscribed.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush telemetry, publish `offline` (retained), disconnect and stop the network thread."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        if self._connected.is_set():
            self._flush_once()
            info = self._client.publish(device_topic(self.device_id, STATE), self._offline_json(), qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:  # not queued: the broker went away meanwhile
                log.warning("offline state of %s not published: %s", self.device_id, exc)
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> AgentControl:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- state -------------------------------------------------------------------------------------

    def publish_state(
        self,
        *,
        mode: str | None = None,
        cut: str | None = None,
        bandwidth_mbps: float | None = None,
        model: str | None = None,
    ) -> None:
        """Publish (retained) the agent's current mode, cut, bandwidth estimate and model as `online`."""
        state = DeviceState(status="online", mode=mode, cut=cut, bandwidth_mbps=bandwidth_mbps, model=model,
                            label=self._label)
        with self._lock:
            self._state = state
        if self._connected.is_set():
            self._last_sent = time.monotonic()
            self._client.publish(device_topic(self.device_id, STATE), state.to_json(), qos=1, retain=True)
        # else: on_connect publishes the latest state

    def _offline_json(self) -> str:
        with self._lock:
            s = self._state
        return DeviceState(status="offline", mode=s.mode, cut=s.cut, model=s.model, label=self._label).to_json()

    # --- telemetry ---------------------------------------------------------------------------------

    def record(self, rec: TelemetryRecord) -> bool:
        """Buffer one request record for the next batch; False (and counted as dropped) when the buffer is full."""
        with self._lock:
            if len(self._buffer) >= self._bound:
                self._dropped += 1
                self.dropped_total += 1
                return False
            self._buffer.append(rec)
            return True

    @property
    def buffered(self) -> int:
        """Records waiting for the next flush."""
        with self._lock:
            return len(self._buffer)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._flush_s):
            self._flush_once()
            if self._connected.is_set() and time.monotonic() - self._last_sent >= self._heartbeat_s:
                self._heartbeat()

    def _heartbeat(self) -> None:
        """Republish the current state (retained): an idle device is seen, and the dashboard shows the truth."""
        with self._lock:
            state = dataclasses.replace(self._state, ts=time.time())
        self._last_sent = time.monotonic()
        self._client.publish(device_topic(self.device_id, STATE), state.to_json(), qos=1, retain=True)

    def _flush_once(self) -> None:
        """Publish everything buffered (in batches of max_batch) while connected."""
        while self._connected.is_set():
            with self._lock:
                if not self._buffer and not self._dropped:
                    return
                n = min(self._max_batch, len(self._buffer))
                batch = TelemetryBatch(tuple(self._buffer.popleft() for _ in range(n)), self._dropped,
                                       batch_id=uuid.uuid4().hex)
                self._dropped = 0
            info = self._client.publish(device_topic(self.device_id, TELEMETRY), batch.to_json(), qos=1)
            self._last_sent = time.monotonic()
            if info.rc == self._queue_full:
                # paho's queue is full and it refused the batch: put it back (front) and try on the next tick.
                # Any other code (no connection: the link dropped since the check above) means paho kept the
                # QoS 1 message and sends it when it reconnects; putting it back too would send it twice.
                with self._lock:
                    self._buffer.extendleft(reversed(batch.records))
                    self._dropped += batch.dropped
                    while len(self._buffer) > self._bound:
                        self._buffer.pop()
                        self._dropped += 1
                        self.dropped_total += 1
                log.debug("telemetry batch of %s not queued (rc=%s); retrying later", self.device_id, info.rc)
                return
            if info.rc != 0:
                return  # queued in paho until the reconnect

    # --- paho callbacks (network thread) -----------------------------------------------------------

    def _handle_connect(self, client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s:%s refused device %s: %s", self.host, self.port, self.device_id, reason_code)
            return
        # Subscribe here so a reconnect (even to a broker that lost the session) resubscribes.
        client.subscribe(device_topic(self.device_id, CMD), qos=1)
        with self._lock:
            state = self._state
        client.publish(device_topic(self.device_id, STATE), state.to_json(), qos=1, retain=True)
        self._connected.set()
        log.info("device %s connected to MQTT %s:%s", self.device_id, self.host, self.port)

    def _handle_connect_fail(self, _client: Any, _userdata: Any) -> None:
        # No broker there, or the TLS handshake refused (e.g. a revoked certificate): say so, telemetry waits.
        if not self._closed:
            log.warning("device %s cannot reach MQTT %s:%s (no broker, or TLS refused); telemetry is buffered "
                        "and retried", self.device_id, self.host, self.port)

    def _handle_subscribe(self, _client: Any, _userdata: Any, _mid: Any, reason_codes: Any, _props: Any) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            log.warning("device %s: broker refused the command subscription: %s", self.device_id, failed)
            return
        self._subscribed.set()

    def _handle_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if not self._closed:
            log.warning("device %s lost MQTT %s:%s (%s); reconnecting", self.device_id, self.host, self.port,
                        reason_code)

    def _handle_command(self, client: Any, _userdata: Any, msg: Any) -> None:
        try:
            cmd = Command.from_json(msg.payload)
        except MqttSchemaError as exc:
            self.bad_commands += 1
            log.warning("device %s refused a command: %s", self.device_id, exc)
            self._nack_unparsable(client, msg.payload, str(exc))
            return
        ack = self._seen.get(cmd.command_id)
        if ack is None:
            try:
                ack = self._on_command(cmd)
                if not isinstance(ack, Ack):
                    raise TypeError(f"on_command returned {type(ack).__name__}, expected Ack")
            except Exception as exc:  # noqa: BLE001 - the handler's failure becomes the ack, with its cause
                log.exception("device %s failed to apply command %s", self.device_id, cmd.command_id)
                ack = Ack(cmd.command_id, False, f"{type(exc).__name__}: {exc}")
            self._seen[cmd.command_id] = ack
            while len(self._seen) > _SEEN_COMMANDS:
                self._seen.popitem(last=False)
        else:
            log.info("device %s: command %s redelivered; not applied again", self.device_id, cmd.command_id)
        client.publish(device_topic(self.device_id, ACK), ack.to_json(), qos=1)

    def _nack_unparsable(self, client: Any, payload: bytes, reason: str) -> None:
        try:
            cid = json.loads(payload).get("command_id")
            ack = Ack(cid, False, f"invalid command: {reason}")
        except (ValueError, AttributeError, TypeError, MqttSchemaError):
            return  # no usable command id: nobody to answer
        client.publish(device_topic(self.device_id, ACK), ack.to_json(), qos=1)

