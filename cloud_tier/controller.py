"""Fleet controller: follows every device's state, telemetry and acks over MQTT into the fleet store,
and sends commands.

Messages are validated (device id from the topic, payload against protos.mqtt) in the network thread and
handed through a bounded queue to one writer thread that stores them in batches, each batch in one transaction.
A bad payload is counted and logged with its reason; it never stops the controller. The MQTT session is
persistent, under a client id kept in the fleet store, so telemetry and acks sent while the controller is down
reach it when it comes back (within the broker's per-client queue: Mosquitto's max_queued_messages, 1000 by
default; the embedded broker's max_stored_messages, 10000).

Nothing is acknowledged before it is stored: the client runs with paho's `manual_ack`, and the writer sends a
message's PUBACK only once the transaction holding it has committed. A controller that crashes, or a store that
cannot write (full disk, file size limit), leaves those messages unacknowledged in its broker session, and the
broker (Mosquitto or the embedded one) delivers them again when the session resumes; batch ids make the second
delivery harmless (FleetStore drops duplicates).

A failed write is retried with exponential backoff and jitter (`retry_min_s` doubling up to `retry_max_s`) for
as long as the failure lasts, each failure counted by kind (`store_errors`) and logged with its real cause.
Meanwhile nothing is acknowledged, so the broker stops sending once its in-flight window is full (Mosquitto:
max_inflight_messages; the embedded broker has no window: it sends everything, up to its max_stored_messages)
and keeps the rest queued; the local queue is bounded too, and a message that still finds it full after
`put_timeout_s` waits on (persistent session; the broker keeps the rest) or is dropped (clean session).
Records are dropped for good (`records_dropped`, by reason, with a log line) only when they cannot be stored at
all: a batch the store refuses for a reason other than a failing file (e.g. a constraint error), or, on a
clean session (a second controller on one store), messages the store could not take before stop().

With `tls` (the controller's certificate from the deployment's CA) the connection is mutual TLS, the broker's
name is checked, and the client id is the certificate's identity, "controller" (the broker refuses any other:
the embedded one checks it, Mosquitto's `use_username_as_clientid` forces it). Without `tls` the connection is
plaintext: loopback only unless `i_know_insecure`, with a warning line.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import IO, Any

from cloud_tier.fleet_store import ACK_OP, STATE_OP, TELEMETRY_OP, FleetStore, describe_error, error_kind
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
# Failures a retry can outlast: the file, the disk or a lock, not the data. Anything else is the batch's fault.
RETRIABLE_KINDS = frozenset({"disk_full", "io_error", "busy", "read_only", "cannot_open", "corrupt"})


@dataclass(frozen=True)
class _Item:
    """One received message on its way to the store: what to write (kind None: nothing, only the PUBACK)."""

    kind: str | None
    device_id: str
    payload: Any
    received: float
    mid: int
    qos: int
    session: int  # the connection it arrived on: a PUBACK belongs to that connection only


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
        retry_min_s: float = 0.05,
        retry_max_s: float = 5.0,
        put_timeout_s: float = 2.0,
    ) -> None:
        """Configure (nothing is connected until start()).

        With `tls` the client id is "controller" (the certificate's identity); without, it defaults to the one
        kept in `store`, and the broker must be on loopback unless `i_know_insecure`. A failed store write is
        retried after `retry_min_s`, doubling up to `retry_max_s` (full jitter); a message finding the queue full
        waits up to `put_timeout_s` (less than the keepalive: the network thread waits meanwhile).
        """
        if not 0 < retry_min_s <= retry_max_s:
            raise ValueError(f"expected 0 < retry_min_s <= retry_max_s, got {retry_min_s} and {retry_max_s}")
        if not 0 <= put_timeout_s < keepalive_s:
            raise ValueError(f"put_timeout_s must be in [0, keepalive_s={keepalive_s}), got {put_timeout_s}")
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
        self.waiting_for_store = 0  # 1 while the network thread waits for room in the queue (a failing store)
        self.stored_records = 0
        self.stored_states = 0
        self.telemetry_messages = 0  # valid telemetry batches received
        self.store_errors: Counter[str] = Counter()  # failed store writes (each attempt), by error_kind
        self.records_dropped: Counter[str] = Counter()  # records given up for good, by reason
        self.store_retries = 0
        self.unacked_at_stop = 0  # messages received but not stored when stop() gave up (the broker keeps them)
        self._retry = (retry_min_s, retry_max_s)
        self._put_timeout_s = put_timeout_s
        self._stopping = threading.Event()
        self._session = 0  # bumped on every CONNACK: PUBACKs of an older connection are not sent on a newer one
        self._session_lock = threading.Lock()
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
        self.persistent = persistent
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
            manual_ack=True,  # PUBACK after the store's commit (see the module docstring)
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
        """Store and acknowledge what is queued (for up to `timeout_s`), then disconnect and stop the writer.

        What arrives after the stop began, or what a failing store could not take in time, stays unacknowledged:
        the broker keeps it in this controller's session for the next controller on the store.
        """
        if self._closed:
            return
        self._closed = True
        if self._writer is not None and self._writer.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout_s)
            except queue.Full:
                log.warning("fleet controller: writer queue still full after %s s; stopping anyway", timeout_s)
            self._writer.join(timeout_s)
            if self._writer.is_alive():  # still retrying a failing store: give up now
                self._stopping.set()
                self._writer.join(timeout_s)
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the lock
            self._lock_file = None

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

    def command(self, device_id: str, cmd: Command, timeout_s: float) -> Ack | None:
        """Send `cmd` to the device and wait up to `timeout_s` for its ack (None: no ack in time).

        ConnectionError when the controller has no MQTT session (nothing would reach the device)."""
        if not self.connected:
            raise ConnectionError(f"the fleet controller is not connected to the MQTT broker {self.host}:{self.port}")
        return self.wait_ack(self.send_command(device_id, cmd), timeout_s)

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
        with self._session_lock:
            self._session += 1
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
        kind: str | None = None
        device_id, payload = "", None  # type: tuple[str, Any]
        try:
            device_id, leaf = parse_topic(msg.topic)
            if leaf == STATE:
                if msg.payload:  # empty: a cleared retained state (device removed), nothing to record
                    kind, payload = STATE_OP, DeviceState.from_json(msg.payload)
            elif leaf == TELEMETRY:
                kind, payload = TELEMETRY_OP, TelemetryBatch.from_json(msg.payload)
                with self._stats_lock:
                    self.telemetry_messages += 1
            elif leaf == ACK:
                ack = Ack.from_json(msg.payload)
                with self._acks_cond:
                    self._acks[ack.command_id] = ack
                    while len(self._acks) > _ACKS_KEPT:
                        self._acks.popitem(last=False)
                    self._acks_cond.notify_all()
                kind, payload = ACK_OP, ack
            # cmd: our own publishes are not subscribed to
        except MqttSchemaError as exc:
            self._bad(msg.topic, str(exc))
            kind = None  # still acknowledged (in order, by the writer): sending it again would not make it valid
        item = _Item(kind, device_id, payload, received, msg.mid, msg.qos, self._session)
        try:
            # Waits while the writer retries a failing store: the broker meanwhile holds what it has not sent.
            self._queue.put(item, timeout=self._put_timeout_s)
        except queue.Full:
            if not self.persistent:  # a clean session: the broker forgets it with the connection
                with self._stats_lock:
                    self.dropped_messages += 1
                self._drop([item], f"store queue full ({self._queue.maxsize}) for {self._put_timeout_s} s",
                           "queue_full")
                return
            # A persistent session: keep waiting. A message left unacknowledged on a live connection would come
            # back only when the session resumes (and Mosquitto holds back the rest behind 20 of them), so this
            # thread waits for the store instead; past 1.5x the keepalive the broker drops the connection, paho
            # reconnects once the store is back, and the broker sends again what was not acknowledged.
            log.warning("fleet controller: store queue full (%d) for %s s; waiting for the store (the broker keeps "
                        "what is not acknowledged)", self._queue.maxsize, self._put_timeout_s)
            self.waiting_for_store += 1
            try:
                while not self._stopping.is_set():
                    try:
                        self._queue.put(item, timeout=self._put_timeout_s)
                        return
                    except queue.Full:
                        continue
            finally:
                self.waiting_for_store -= 1
            with self._stats_lock:
                self.dropped_messages += 1  # stopping: left unacknowledged, the broker keeps it

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
            batch = [i for i in items if i is not _STOP]
            if batch and self._store_with_retry(batch):
                self._ack(batch)
            if stop or self._stopping.is_set():
                return

    def _store_with_retry(self, items: list[_Item]) -> bool:
        """Store `items` in one transaction, retrying while the store fails for a reason retrying can outlast;
        True once stored (or given up for good and dropped), False when stop() ended the retries."""
        delay_min, delay_max = self._retry
        attempt = 0
        while True:
            try:
                self._store(items)
                if attempt:
                    log.warning("fleet controller: the fleet store accepts writes again after %d failed attempts",
                                attempt)
                return True
            except sqlite3.Error as exc:
                kind = error_kind(exc)
                with self._stats_lock:
                    self.store_errors[kind] += 1
                records = sum(len(i.payload.records) for i in items if i.kind == TELEMETRY_OP)
                if kind not in RETRIABLE_KINDS:
                    return self._store_one_by_one(items, exc)
                if attempt == 0 or attempt % 20 == 0:
                    log.error("fleet controller: storing %d messages (%d records) failed: %s; retrying with "
                              "backoff, nothing is acknowledged until it is stored", len(items), records,
                              self.store.explain(exc))
            attempt += 1
            with self._stats_lock:
                self.store_retries += 1
            delay = random.uniform(0, min(delay_max, delay_min * 2 ** min(attempt, 30)))  # full jitter
            if self._stopping.wait(delay):
                self._given_up(items, "stopped while the fleet store was failing")
                return False

    def _store_one_by_one(self, items: list[_Item], exc: BaseException) -> bool:
        """A batch refused for its data, not the file: store each message alone and drop only those refused."""
        log.error("fleet controller: the fleet store refused a batch of %d messages (%s); storing them one by one",
                  len(items), describe_error(exc))
        for item in items:
            try:
                self._store([item])
            except sqlite3.Error as one:
                with self._stats_lock:
                    self.store_errors[error_kind(one)] += 1
                self._drop([item], f"refused by the fleet store: {describe_error(one)}", "store_refused")
        return True

    def _given_up(self, items: list[_Item], why: str) -> None:
        with self._stats_lock:
            self.unacked_at_stop += len(items)
        if self.persistent:
            log.warning("fleet controller: %s: %d messages left unacknowledged; the broker keeps them in this "
                        "store's session for the next controller", why, len(items))
        else:
            self._drop(items, f"{why} (clean session: the broker keeps nothing for this controller)", "stopped")

    def _drop(self, items: list[_Item], why: str, reason: str) -> None:
        records = sum(len(i.payload.records) for i in items if i.kind == TELEMETRY_OP)
        with self._stats_lock:
            self.records_dropped[reason] += records
        log.error("fleet controller: dropped %d messages (%d telemetry records) for good: %s", len(items), records,
                  why)

    def _ack(self, items: list[_Item]) -> None:
        """PUBACK every QoS 1 message of `items`, in order, on the connection it arrived on."""
        with self._session_lock:
            for item in items:
                if item.qos > 0 and item.session == self._session:
                    self._client.ack(item.mid, item.qos)
                # else: an older connection's message; the broker delivers it again on this one

    def _store(self, items: list[_Item]) -> None:
        ops = [(i.kind, i.device_id, self._op_payload(i), i.received) for i in items if i.kind is not None]
        if not ops:
            return
        out = self.store.write(ops, items[-1].received)
        with self._stats_lock:
            self.stored_records += out["records"]
            self.stored_states += out["states"]
        unmatched = sum(1 for i in items if i.kind == ACK_OP) - out["acks_matched"]
        if unmatched > 0:
            log.info("fleet controller: %d acks matched no command sent by this store", unmatched)

    @staticmethod
    def _op_payload(item: _Item) -> Any:
        if item.kind == TELEMETRY_OP:
            return item.payload.records, item.payload.dropped, item.payload.batch_id
        return item.payload
