"""MQTT control and telemetry contract: topic names and JSON payload schemas, shared by edge and cloud.

Payloads are JSON (not protobuf) so `mosquitto_sub -v -t 'splitinfer/v1/#'` shows them as they are.
Every `from_json` validates types and ranges and raises `MqttSchemaError` naming the offending field.

Topics, all under `splitinfer/v1/devices/{device_id}/`:
  state      retained; DeviceState (the agent's last will publishes status "offline" here)
  telemetry  TelemetryBatch: per-request records plus how many were dropped since the previous batch, under a
             batch id, so that a batch delivered twice (QoS 1 is at-least-once) is stored once
  cmd        QoS 1; Command (switch_cut, switch_mode, ping), each with a command id
  cmd/ack    Ack (command id, ok, message)

Who may do what (one definition, `ACL`: the embedded broker's topic plugin and the Mosquitto ACL file are both
made from it): a device, identified by its certificate (identity = device id), may publish only its own state,
telemetry and ack topics and read only its own command topic; the controller (identity CONTROLLER) may publish
commands to every device and read every device topic. Nobody else may do anything.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from models.validate import FieldError, check_bool, check_choice, check_int, check_number, check_text
from protos.address import is_loopback

__all__ = [
    "TOPIC_PREFIX",
    "STATE",
    "TELEMETRY",
    "CMD",
    "ACK",
    "LEAVES",
    "STAGES",
    "MqttSchemaError",
    "check_device_id",
    "device_topic",
    "fleet_filter",
    "parse_topic",
    "DeviceState",
    "TelemetryRecord",
    "TelemetryBatch",
    "Command",
    "Ack",
    "new_command_id",
    "CONTROLLER",
    "ACL",
    "acl_allows",
    "mosquitto_acl",
    "MqttTls",
    "insecure_mqtt",
    "is_loopback",
]

TOPIC_PREFIX = "splitinfer/v1/devices"
STATE = "state"
TELEMETRY = "telemetry"
CMD = "cmd"
ACK = "cmd/ack"
LEAVES = (STATE, TELEMETRY, CMD, ACK)

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # always used with fullmatch: `$` would admit a trailing newline
STATUSES = ("online", "offline")
MODES = ("split", "local")
SERVED_BY = ("cloud", "edge")
COMMAND_KINDS = ("switch_cut", "switch_mode", "ping")
STAGES = ("head_ms", "encode_ms", "network_ms", "queue_ms", "tail_ms", "total_ms")

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # refuse larger payloads before parsing them
MAX_RECORDS_PER_BATCH = 10_000
MAX_TEXT = 256  # cut ids, model names, labels, request ids, messages
MAX_MS = 86_400_000.0  # a day: anything longer is a unit mistake, not a latency

CONTROLLER = "controller"  # the fleet controller's certificate identity (and MQTT client id / username)
DEVICE = "%u"  # in ACL entries: the connected device's own id
# (identity, access, topic pattern): access "write" = publish, "read" = subscribe and receive. DEVICE stands for
# the connected device's own id (Mosquitto's %u; `use_identity_as_username` makes the username the cert's CN).
ACL: tuple[tuple[str, str, str], ...] = (
    (DEVICE, "write", f"{TOPIC_PREFIX}/{DEVICE}/{STATE}"),
    (DEVICE, "write", f"{TOPIC_PREFIX}/{DEVICE}/{TELEMETRY}"),
    (DEVICE, "write", f"{TOPIC_PREFIX}/{DEVICE}/{ACK}"),
    (DEVICE, "read", f"{TOPIC_PREFIX}/{DEVICE}/{CMD}"),
    (CONTROLLER, "write", f"{TOPIC_PREFIX}/+/{CMD}"),
    (CONTROLLER, "read", f"{TOPIC_PREFIX}/#"),
)


class MqttSchemaError(FieldError):
    """A topic or payload does not match the splitinfer MQTT contract; `key` names the field when there is one."""

    label = "field"

    def __init__(self, key_or_message: str | None, detail: str | None = None):
        # MqttSchemaError("whole-payload message") or MqttSchemaError("field", "what was expected")
        if detail is None:
            super().__init__(None, key_or_message or "")
        else:
            super().__init__(key_or_message, detail)


def check_device_id(device_id: Any) -> str:
    """Return `device_id` if it matches ^[A-Za-z0-9_-]{1,64}$, else raise MqttSchemaError."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise MqttSchemaError(
            f"device id {device_id!r} is invalid: expected 1-64 characters from [A-Za-z0-9_-] "
            "(no '/', '+', '#' or spaces, so it cannot change the topic)"
        )
    return device_id


def device_topic(device_id: str, leaf: str) -> str:
    """Topic `splitinfer/v1/devices/{device_id}/{leaf}`; the id is validated before the topic is built."""
    check_device_id(device_id)
    if leaf not in LEAVES:
        raise MqttSchemaError(f"topic leaf {leaf!r} is unknown: expected one of {LEAVES}")
    return f"{TOPIC_PREFIX}/{device_id}/{leaf}"


def fleet_filter(leaf: str) -> str:
    """Subscription filter matching `leaf` for every device, e.g. `splitinfer/v1/devices/+/state`."""
    if leaf not in LEAVES:
        raise MqttSchemaError(f"topic leaf {leaf!r} is unknown: expected one of {LEAVES}")
    return f"{TOPIC_PREFIX}/+/{leaf}"


def parse_topic(topic: str) -> tuple[str, str]:
    """Split a device topic back into (device_id, leaf); raise MqttSchemaError if it is not one."""
    prefix = TOPIC_PREFIX + "/"
    if not isinstance(topic, str) or not topic.startswith(prefix):
        raise MqttSchemaError(f"topic {topic!r} is not under {prefix!r}")
    device_id, sep, leaf = topic[len(prefix):].partition("/")
    if not sep or leaf not in LEAVES:
        raise MqttSchemaError(f"topic {topic!r} has no known leaf: expected {prefix}<device_id>/<one of {LEAVES}>")
    return check_device_id(device_id), leaf


# --- field validators: each names the field it rejects -------------------------------------------------


def _obj(data: str | bytes | bytearray | dict[str, Any], what: str) -> dict[str, Any]:
    if isinstance(data, dict):
        return data
    if isinstance(data, (bytes, bytearray)):
        if len(data) > MAX_PAYLOAD_BYTES:
            raise MqttSchemaError(f"{what} payload is {len(data)} bytes: expected at most {MAX_PAYLOAD_BYTES}")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MqttSchemaError(f"{what} payload is not UTF-8 JSON: {exc}") from exc
    if not isinstance(data, str):
        raise MqttSchemaError(f"{what} payload must be JSON text, got {type(data).__name__}")
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise MqttSchemaError(f"{what} payload is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MqttSchemaError(f"{what} payload must be a JSON object, got {type(obj).__name__}")
    return obj


# Field checks (protos/validate.py), raising MqttSchemaError naming the field; None passes where it may be absent.


def _text(value: Any, name: str, *, optional: bool = False, allow_empty: bool = False) -> str | None:
    if value is None and optional:
        return None
    return check_text(name, value, max_len=MAX_TEXT, allow_empty=allow_empty, error=MqttSchemaError)


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    return check_choice(name, value, choices, error=MqttSchemaError)


def _number(value: Any, name: str, lo: float, hi: float, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    return check_number(name, value, lo, hi, error=MqttSchemaError)


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


# --- payloads ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    """Retained presence and configuration of one device (`state` topic)."""

    status: str  # online | offline
    mode: str | None = None  # split | local
    cut: str | None = None
    bandwidth_mbps: float | None = None
    model: str | None = None
    # Free-text display name: the only device-supplied text the dashboard shows besides the id.
    label: str | None = None
    ts: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        _choice(self.status, "status", STATUSES)
        if self.mode is not None:
            _choice(self.mode, "mode", MODES)
        _text(self.cut, "cut", optional=True)
        _number(self.bandwidth_mbps, "bandwidth_mbps", 0.0, 1e6, optional=True)
        _text(self.model, "model", optional=True)
        _text(self.label, "label", optional=True, allow_empty=True)
        _number(self.ts, "ts", 0.0, 1e11)

    def to_json(self) -> str:
        """Serialize to compact JSON."""
        return _dumps(
            {"status": self.status, "mode": self.mode, "cut": self.cut, "bandwidth_mbps": self.bandwidth_mbps,
             "model": self.model, "label": self.label, "ts": self.ts}
        )

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> DeviceState:
        """Parse and validate a `state` payload."""
        o = _obj(data, "state")
        if "status" not in o:
            raise MqttSchemaError("status", "is missing from the state payload")
        return cls(status=o["status"], mode=o.get("mode"), cut=o.get("cut"),
                   bandwidth_mbps=o.get("bandwidth_mbps"), model=o.get("model"), label=o.get("label"),
                   ts=o.get("ts", time.time()))


@dataclass(frozen=True)
class TelemetryRecord:
    """Latency breakdown of one request, in milliseconds per stage."""

    request_id: str
    ts: float
    head_ms: float
    encode_ms: float
    network_ms: float
    queue_ms: float
    tail_ms: float
    total_ms: float
    served_by: str  # cloud | edge
    cut: str

    def __post_init__(self) -> None:
        _text(self.request_id, "request_id")
        _number(self.ts, "ts", 0.0, 1e11)
        for stage in STAGES:
            _number(getattr(self, stage), stage, 0.0, MAX_MS)
        _choice(self.served_by, "served_by", SERVED_BY)
        _text(self.cut, "cut")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the wire field names."""
        return {"request_id": self.request_id, "ts": self.ts, "head_ms": self.head_ms,
                "encode_ms": self.encode_ms, "network_ms": self.network_ms, "queue_ms": self.queue_ms,
                "tail_ms": self.tail_ms, "total_ms": self.total_ms, "served_by": self.served_by, "cut": self.cut}

    @classmethod
    def from_dict(cls, o: Any, where: str = "record") -> TelemetryRecord:
        """Validate one record object; errors name `where` and the field."""
        if not isinstance(o, dict):
            raise MqttSchemaError(f"{where} must be a JSON object, got {type(o).__name__}")
        names = ("request_id", "ts", *STAGES, "served_by", "cut")
        missing = [n for n in names if n not in o]
        if missing:
            raise MqttSchemaError(f"{where}.{missing[0]}", "is missing")
        try:
            return cls(**{n: o[n] for n in names})
        except MqttSchemaError as exc:
            raise MqttSchemaError(f"{where}.{exc.key}" if exc.key else where, exc.detail) from exc


@dataclass(frozen=True)
class TelemetryBatch:
    """A batch of request records (`telemetry` topic) plus records dropped since the last batch.

    `batch_id` ([A-Za-z0-9_-], 1-64 characters; the agent sends a fresh uuid4 hex per batch) lets the fleet store
    keep a batch that reaches it twice (an agent resends an unacknowledged QoS 1 publish after a reconnect, and
    the broker passes both copies on) once. An empty id (older agents) is stored every time it arrives.
    """

    records: tuple[TelemetryRecord, ...]
    dropped: int = 0
    batch_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.records, tuple) or not all(isinstance(r, TelemetryRecord) for r in self.records):
            raise MqttSchemaError("records", "expected a tuple of TelemetryRecord")
        if len(self.records) > MAX_RECORDS_PER_BATCH:
            raise MqttSchemaError(
                "records", f"expected at most {MAX_RECORDS_PER_BATCH} entries, got {len(self.records)}"
            )
        check_int("dropped", self.dropped, 0, error=MqttSchemaError)
        if self.batch_id != "" and not (isinstance(self.batch_id, str) and DEVICE_ID_RE.fullmatch(self.batch_id)):
            raise MqttSchemaError("batch_id", f"expected 1-64 characters from [A-Za-z0-9_-], got {self.batch_id!r}")

    def to_json(self) -> str:
        """Serialize to compact JSON."""
        obj: dict[str, Any] = {"records": [r.to_dict() for r in self.records], "dropped": self.dropped}
        if self.batch_id:
            obj["batch_id"] = self.batch_id
        return _dumps(obj)

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> TelemetryBatch:
        """Parse and validate a `telemetry` payload."""
        o = _obj(data, "telemetry")
        recs = o.get("records")
        if not isinstance(recs, list):
            raise MqttSchemaError("records", f"expected a list, got {type(recs).__name__}")
        if len(recs) > MAX_RECORDS_PER_BATCH:
            raise MqttSchemaError("records", f"expected at most {MAX_RECORDS_PER_BATCH} entries, got {len(recs)}")
        records = tuple(TelemetryRecord.from_dict(r, f"records[{i}]") for i, r in enumerate(recs))
        return cls(records=records, dropped=o.get("dropped", 0), batch_id=o.get("batch_id", ""))


def new_command_id() -> str:
    """A fresh unique command id."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Command:
    """A control command (`cmd` topic, QoS 1). Use Command.switch_cut / switch_mode / ping to build one."""

    kind: str  # switch_cut | switch_mode | ping
    command_id: str = field(default_factory=new_command_id)
    cut: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        _choice(self.kind, "kind", COMMAND_KINDS)
        _text(self.command_id, "command_id")
        if self.kind == "switch_cut":
            _text(self.cut, "cut")
        elif self.cut is not None:
            raise MqttSchemaError("cut", f"expected only with kind 'switch_cut', not {self.kind!r}")
        if self.kind == "switch_mode":
            _choice(self.mode, "mode", MODES)
        elif self.mode is not None:
            raise MqttSchemaError("mode", f"expected only with kind 'switch_mode', not {self.kind!r}")

    @classmethod
    def switch_cut(cls, cut: str, command_id: str | None = None) -> Command:
        """Command the agent to run with cut `cut`."""
        return cls("switch_cut", command_id or new_command_id(), cut=cut)

    @classmethod
    def switch_mode(cls, mode: str, command_id: str | None = None) -> Command:
        """Command the agent into mode 'split' or 'local'."""
        return cls("switch_mode", command_id or new_command_id(), mode=mode)

    @classmethod
    def ping(cls, command_id: str | None = None) -> Command:
        """A no-op command the agent acknowledges (liveness / round-trip measurement)."""
        return cls("ping", command_id or new_command_id())

    def to_json(self) -> str:
        """Serialize to compact JSON (only the fields the kind uses)."""
        o: dict[str, Any] = {"command_id": self.command_id, "kind": self.kind}
        if self.cut is not None:
            o["cut"] = self.cut
        if self.mode is not None:
            o["mode"] = self.mode
        return _dumps(o)

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> Command:
        """Parse and validate a `cmd` payload."""
        o = _obj(data, "cmd")
        for name in ("command_id", "kind"):
            if name not in o:
                raise MqttSchemaError(name, "is missing from the cmd payload")
        return cls(kind=o["kind"], command_id=o["command_id"], cut=o.get("cut"), mode=o.get("mode"))


@dataclass(frozen=True)
class Ack:
    """The agent's answer to a Command (`cmd/ack` topic)."""

    command_id: str
    ok: bool
    message: str = ""

    def __post_init__(self) -> None:
        _text(self.command_id, "command_id")
        check_bool("ok", self.ok, error=MqttSchemaError)
        check_text("message", self.message, error=MqttSchemaError)

    def to_json(self) -> str:
        """Serialize to compact JSON (message truncated to the schema limit)."""
        return _dumps({"command_id": self.command_id, "ok": self.ok, "message": self.message[:MAX_TEXT]})

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> Ack:
        """Parse and validate a `cmd/ack` payload."""
        o = _obj(data, "cmd/ack")
        for name in ("command_id", "ok"):
            if name not in o:
                raise MqttSchemaError(name, "is missing from the cmd/ack payload")
        msg = o.get("message", "")
        _text(msg, "message", allow_empty=True)
        return cls(command_id=o["command_id"], ok=o["ok"], message=msg)


# --- access control and transport security ---------------------------------------------------------------


def _matches(pattern: str, topic: str, *, is_filter: bool) -> bool:
    """Whether `topic` (a topic name, or with `is_filter` a subscription filter) lies inside `pattern`.

    `pattern` may use `+` (one level) and a final `#`. A filter is inside the pattern only when every topic it
    can match is: its `+` needs a `+` or `#` in the pattern, its `#` needs a `#`.
    """
    p_levels, t_levels = pattern.split("/"), topic.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return i == len(p_levels) - 1
        if i >= len(t_levels):
            return False
        t = t_levels[i]
        if t in ("+", "#"):
            if not is_filter or t == "#" or p != "+":
                return False
            continue
        if p not in ("+", t):
            return False
    return len(p_levels) == len(t_levels)


def acl_allows(identity: str | None, access: str, topic: str) -> bool:
    """Whether `identity` (a device id or CONTROLLER; None: unauthenticated) may `access` `topic`.

    `access` is "write" (publish a message to the topic name `topic`), "read" (receive a message on the topic
    name `topic`) or "subscribe" (subscribe with the filter `topic`, which must lie inside a "read" entry).
    """
    if identity is None or access not in ("write", "read", "subscribe"):
        return False
    wanted = "read" if access == "subscribe" else access
    for who, acc, pattern in ACL:
        if acc != wanted:
            continue
        if who == DEVICE:
            if identity == CONTROLLER or not DEVICE_ID_RE.fullmatch(identity):
                continue
            pattern = pattern.replace(DEVICE, identity)
        elif who != identity:
            continue
        if _matches(pattern, topic, is_filter=access == "subscribe"):
            return True
    return False


def mosquitto_acl() -> str:
    """The ACL file for Mosquitto (`acl_file`), from ACL: `pattern` lines for devices, `user` lines for the rest."""
    lines = ["# splitinfer MQTT ACL (made from protos.mqtt.ACL by `split-cloud mosquitto-config`; do not edit).",
             "# Usernames are certificate identities (use_identity_as_username): a device's CN is its id.", ""]
    for who in dict.fromkeys(w for w, _, _ in ACL if w != DEVICE):
        lines.append(f"user {who}")
        lines += [f"topic {acc} {pattern}" for w, acc, pattern in ACL if w == who]
        lines.append("")
    lines.append("# every other client (devices): its own topics only")
    lines += [f"pattern {acc} {pattern}" for w, acc, pattern in ACL if w == DEVICE]
    return "\n".join(lines) + "\n"




@dataclass(frozen=True)
class MqttTls:
    """What an MQTT client needs for mutual TLS: the CA to trust, its certificate and key (PEM paths).

    The broker's certificate must name the host the client connects to (`split-cloud ca init --host`).
    """

    ca: str
    cert: str
    key: str

    def apply(self, client: Any) -> None:
        """Set TLS on a paho client: TLS 1.2+, the broker's certificate checked against `ca` and its name."""
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.check_hostname = True
        client.tls_set_context(ctx)
        client.tls_insecure_set(False)


def insecure_mqtt(host: str, who: str, *, i_know_insecure: bool = False,
                  log: logging.Logger | None = None) -> None:
    """Allow a plaintext MQTT connection to `host` (loopback only unless `i_know_insecure`), with a warning line.

    Raises ValueError for a non-loopback host without `i_know_insecure`.
    """
    if not is_loopback(host) and not i_know_insecure:
        raise ValueError(f"{who}: plaintext MQTT to {host!r} is refused: anyone on the path could read and forge "
                         "the fleet's messages. Give TLS files (a CA, a certificate and its key), or, on a network "
                         "you trust, the explicit i-know-insecure setting")
    (log or logging.getLogger(__name__)).warning(
        "INSECURE: %s uses plaintext MQTT to %s without certificates (anyone who can reach the broker can read "
        "and forge this traffic)", who, host)
