"""Fleet controller: follows every device's state, telemetry and acks over MQTT into the fleet store,
and sends commands.

Messages are validated (device id from the topic, payload against protos.mqtt) in the network thread and
handed through a bounded queue to one writer thread that stores them in batches. A bad payload is
counted and logged with its reason; it never stops the controller. The MQTT session is persistent, under a
client id kept in the fleet store, so telemetry and acks sent while the controller is down reach it when it
comes back (within the broker's per-client queue: Mosquitto's max_queued_messages, 1000 by default).

With `tls` (the controller's certificate from the deployment's CA) the connection is mutual TLS, the broker's
name is checked, and the client id is the certificate's identity, "controller" (the broker refuses any other:
the embedded one checks it, Mosquitto's `use_username_as_clientid` forces it). Without `tls` the connection is
plaintext: loopback only unless `i_know_insecure`, with a warning line.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import OrderedDict
from typing import IO, Any

from cloud_tier.fleet_store import FleetStore
from models.extras import require
from protos.mqtt import (
    ACK,
    CMD,
    CONTROLLER,
    STATE,
    TELEMETRY,
    Ack,
    Command,
    DeviceState,
    MqttSchemaError,
    MqttTls,
    TelemetryBatch,
    check_device_id,
    device_topic,
    fleet_filter,
    insecure_mqtt,
    parse_topic,
)

__all__ = ["FleetController"]

log = logging.getLogger(__name__)

_STOP = object()
_ACKS_KEPT = 4096


def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    # paho never sets TCP_NODELAY; without it each QoS 1 exchange waits ~40-88 ms (Nagle + delayed ACK).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:
        log.debug("TCP_NODELAY not set on %r: %s", sock, exc)


def _claim(store: FleetStore) -> IO[bytes] | None:
    """An exclusive lock on `<store>.controller.lock` (held while the file stays open); None if already held."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, every controller on the store shares its session
        return open(os.devnull, "rb")
    f = open(f"{store.path}.controller.lock", "ab")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


class FleetController:
    """Subscribes to the fleet's state/telemetry/ack topics, stores them, and publishes commands."""

    def __init__(
        self,
        store: FleetStore,
        broker_host: str,
        broker_port: int,
        *,
        queue_bound: int = 10_000,
        max_batch_messages: int = 500,
        keepalive_s: int = 30,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 30,
        client_id: str | None = None,
        tls: MqttTls | None = None,
        i_know_insecure: bool = False,
    ) -> None:
        """Configure (nothing is connected until start()).

        With `tls` the client id is "controller" (the certificate's identity); without, it defaults to the one
        kept in `store`, and the broker must be on loopback unless `i_know_insecure`.
        """
        mqtt = require("paho.mqtt.client", "edge")
        if tls is None:
            insecure_mqtt(broker_host, "the fleet controller", i_know_insecure=i_know_insecure, log=log)
        elif client_id is not None and client_id != CONTROLLER:
            raise ValueError(f"with TLS the controller's client id is its certificate's identity {CONTROLLER!r}, "
                             f"not {client_id!r}")
        self.store = store
        self.host, self.port = broker_host, broker_port
        self._keepalive = keepalive_s
        self._max_batch = max_batch_messages
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_bound)
        self._stats_lock = threading.Lock()
        self.bad_payloads = 0
        self.dropped_messages = 0  # refused because the queue was full
        self.stored_records = 0
        self.stored_states = 0
        self.telemetry_messages = 0  # valid telemetry batches received
        self._acks: OrderedDict[str, Ack] = OrderedDict()
        self._acks_cond = threading.Condition()
        self._connected = threading.Event()
        self._writer: threading.Thread | None = None
        self._closed = False
        # A persistent session under an id kept in the store: while this controller is down (restart, crash,
        # lost link) the broker queues the fleet's QoS 1 telemetry and acks for it, and a controller started
        # again on the same store receives them. Retained states rebuild the device picture on every connect.
        # Only one controller per store may hold that id (two would take the session from each other in
        # turn): a second one gets a fresh id and a clean session.
        self._lock_file = _claim(store) if client_id is None else None
        persistent = client_id is not None or self._lock_file is not None
        fresh = f"splitinfer-controller-{uuid.uuid4().hex[:12]}"
        if tls is not None and client_id is None and self._lock_file is None:
            raise RuntimeError(f"fleet controller: another controller already runs on the fleet store {store.path}; "
                               f"with certificates there is one controller identity ({CONTROLLER!r}), and a second "
                               "session under it would take the first one's over")
        if tls is not None:
            self.client_id = CONTROLLER
        elif client_id is not None:
            self.client_id = client_id
        elif persistent:
            self.client_id = store.setting("controller_client_id", fresh)
        else:
            self.client_id = fresh
            log.warning("fleet controller: another controller already runs on the fleet store %s; this one uses "
                        "a clean MQTT session (it stores every message the other stores too, and keeps nothing "
                        "for itself while it is down)", store.path)
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=not persistent,
            protocol=mqtt.MQTTv311,
        )
        if tls is not None:
            tls.apply(self._client)
        self._client.reconnect_delay_set(min_delay=reconnect_min_s, max_delay=reconnect_max_s)
        self._client.max_queued_messages_set(queue_bound)
        self._client.max_inflight_messages_set(100)
        self._client.on_socket_open = _nodelay
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_message = self._handle_message

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, wait_s: float | None = 10.0) -> FleetController:
        """Start the writer thread and connect (reconnecting with bounded backoff)."""
        self._writer = threading.Thread(target=self._write_loop, name="fleet-writer", daemon=True)
        self._writer.start()
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        if wait_s is not None and not self._connected.wait(wait_s):
            self.stop()
            raise TimeoutError(f"fleet controller: MQTT broker {self.host}:{self.port} did not accept the "
                               f"connection within {wait_s} s")
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect, store what is queued, and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the lock
            self._lock_file = None
        self._client.disconnect()
        self._client.loop_stop()
        if self._writer is not None:
            try:
                self._queue.put(_STOP, timeout=timeout_s)
            except queue.Full:
                log.warning("fleet controller: writer queue still full after %s s; stopping anyway", timeout_s)
            self._writer.join(timeout_s)

    def __enter__(self) -> FleetController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """Whether the MQTT session is up and the broker has confirmed the fleet subscriptions."""
        return self._connected.is_set()

    @property
    def pending(self) -> int:
        """Messages received but not yet stored."""
        return self._queue.qsize()

    # --- commands ----------------------------------------------------------------------------------

    def send_command(self, device_id: str, cmd: Command) -> str:
        """Publish `cmd` to the device (QoS 1; queued by the broker while the device is offline); return its id."""
        check_device_id(device_id)
        if not isinstance(cmd, Command):
            raise TypeError(f"send_command expects a protos.mqtt.Command, got {type(cmd).__name__}")
        self.store.record_command(device_id, cmd)
        info = self._client.publish(device_topic(device_id, CMD), cmd.to_json(), qos=1)
        if info.rc != 0:
            raise ConnectionError(f"command {cmd.command_id} to {device_id!r} was not queued for publishing "
                                  f"(paho rc={info.rc}); is the broker {self.host}:{self.port} reachable?")
        return cmd.command_id

    @property
    def duplicate_batches(self) -> int:
        """Telemetry batches the store skipped as second deliveries (protos.mqtt.TelemetryBatch.batch_id)."""
        return self.store.duplicate_batches

    @property
    def future_timestamps(self) -> int:
        """Record and state times more than fleet_store.MAX_FUTURE_S ahead of receipt, stored as the receipt time."""
        return self.store.future_timestamps

    def wait_ack(self, command_id: str, timeout_s: float) -> Ack | None:
        """Block until the ack of `command_id` arrives or `timeout_s` passes (then None)."""
        deadline = time.monotonic() + timeout_s
        with self._acks_cond:
            while command_id not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._acks_cond.wait(left)
            return self._acks[command_id]

    # --- paho callbacks (network thread) -----------------------------------------------------------

    def _handle_connect(self, client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            log.warning("fleet controller: broker %s:%s refused the connection: %s", self.host, self.port,
                        reason_code)
            return
        # Connected counts from the broker's SUBACK, not from CONNACK: a message published in between would
        # find no subscription and be lost to the controller.
        client.subscribe([(fleet_filter(STATE), 1), (fleet_filter(TELEMETRY), 1), (fleet_filter(ACK), 1)])

    def _handle_subscribe(self, _client: Any, _userdata: Any, _mid: Any, reason_codes: Any, _props: Any) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            log.warning("fleet controller: broker %s:%s refused the fleet subscriptions: %s", self.host, self.port,
                        failed)
            return
        self._connected.set()
        log.info("fleet controller connected to MQTT %s:%s and subscribed", self.host, self.port)

    def _handle_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self._connected.clear()
        if not self._closed:
            log.warning("fleet controller lost MQTT %s:%s (%s); reconnecting", self.host, self.port, reason_code)

    def _bad(self, topic: str, reason: str) -> None:
        with self._stats_lock:
            self.bad_payloads += 1
        log.warning("fleet controller ignored a message on %r: %s", topic[:200], reason)

    def _handle_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        received = time.time()
        try:
            device_id, leaf = parse_topic(msg.topic)
            if leaf == STATE:
                if not msg.payload:
                    return  # a cleared retained state (device removed): nothing to record
                item: Any = (STATE, device_id, DeviceState.from_json(msg.payload), received)
            elif leaf == TELEMETRY:
                item = (TELEMETRY, device_id, TelemetryBatch.from_json(msg.payload), received)
                with self._stats_lock:
                    self.telemetry_messages += 1
            elif leaf == ACK:
                ack = Ack.from_json(msg.payload)
                with self._acks_cond:
                    self._acks[ack.command_id] = ack
                    while len(self._acks) > _ACKS_KEPT:
                        self._acks.popitem(last=False)
                    self._acks_cond.notify_all()
                item = (ACK, device_id, ack, received)
            else:
                return  # cmd: our own publishes are not subscribed to
        except MqttSchemaError as exc:
            self._bad(msg.topic, str(exc))
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._stats_lock:
                self.dropped_messages += 1
            log.warning("fleet controller: store queue full (%d); dropped a %s message from %s",
                        self._queue.maxsize, item[0], item[1])

    # --- writer thread -----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            items = [first]
            while len(items) < self._max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(i is _STOP for i in items)
            try:
                self._store([i for i in items if i is not _STOP])
            except Exception:  # noqa: BLE001 - a store failure is logged with its cause; the loop goes on
                log.exception("fleet controller: storing %d messages failed", len(items))
            if stop:
                return

    def _store(self, items: list[Any]) -> None:
        batches = []
        for kind, device_id, payload, received in items:
            if kind == TELEMETRY:
                batches.append((device_id, payload.records, payload.dropped, payload.batch_id))
                continue
            # Keep order: telemetry gathered so far goes in before a state change of the same device.
            if batches:
                self._insert(batches, received)
                batches = []
            if kind == STATE:
                self.store.upsert_state(device_id, payload, received)
                with self._stats_lock:
                    self.stored_states += 1
            elif kind == ACK and not self.store.record_ack(device_id, payload, received):
                log.info("fleet controller: ack %s from %s matches no command sent by this store",
                         payload.command_id, device_id)
        if batches:
            self._insert(batches, items[-1][3])

    def _insert(self, batches: list[Any], received: float) -> None:
        n = self.store.insert_records(batches, received)
        with self._stats_lock:
            self.stored_records += n
