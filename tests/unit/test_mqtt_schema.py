"""The MQTT contract: topic helpers and payload validation (no broker needed)."""

from __future__ import annotations

import json

import pytest

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
    TelemetryBatch,
    TelemetryRecord,
    acl_allows,
    device_topic,
    fleet_filter,
    is_loopback,
    mosquitto_acl,
    parse_topic,
)


def rec(**over: object) -> TelemetryRecord:
    base = dict(request_id="r1", ts=1.7e9, head_ms=1.0, encode_ms=0.5, network_ms=3.0, queue_ms=0.2, tail_ms=2.0,
                total_ms=6.7, served_by="cloud", cut="c1")
    base.update(over)
    return TelemetryRecord(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("leaf", [STATE, TELEMETRY, CMD, ACK])
def test_topic_round_trip(leaf: str) -> None:
    topic = device_topic("pi-07_a", leaf)
    assert topic == f"splitinfer/v1/devices/pi-07_a/{leaf}"
    assert parse_topic(topic) == ("pi-07_a", leaf)


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "dev ice", "x" * 65, "<img src=x>", "é", None, 7])
def test_bad_device_ids_are_refused_before_a_topic_is_built(bad: object) -> None:
    with pytest.raises(MqttSchemaError, match="device id"):
        device_topic(bad, STATE)  # type: ignore[arg-type]


@pytest.mark.parametrize("topic", ["splitinfer/v1/devices/a/b/c", "other/a/state", "splitinfer/v1/devices/a",
                                   "splitinfer/v1/devices/a+/state", "splitinfer/v1/devices//state"])
def test_parse_topic_refuses_foreign_topics(topic: str) -> None:
    with pytest.raises(MqttSchemaError):
        parse_topic(topic)


def test_fleet_filter() -> None:
    assert fleet_filter(ACK) == "splitinfer/v1/devices/+/cmd/ack"
    with pytest.raises(MqttSchemaError, match="leaf"):
        fleet_filter("nope")


def test_payloads_round_trip() -> None:
    s = DeviceState(status="online", mode="split", cut="c3", bandwidth_mbps=5.85, model="resnet", label="lab <1>")
    assert DeviceState.from_json(s.to_json()) == s
    b = TelemetryBatch((rec(), rec(request_id="r2", served_by="edge")), dropped=3)
    assert TelemetryBatch.from_json(b.to_json().encode()) == b
    assert "batch_id" not in b.to_json()  # an older agent's batch: no id on the wire
    with_id = TelemetryBatch((rec(),), batch_id="0f3a9c_b-1")
    assert TelemetryBatch.from_json(with_id.to_json()) == with_id
    for c in (Command.switch_cut("c2"), Command.switch_mode("local"), Command.ping()):
        assert Command.from_json(c.to_json()) == c
    a = Ack("id1", True, "switched")
    assert Ack.from_json(a.to_json()) == a


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"status": "maybe"}, "status"),
        ({"status": "online", "mode": "hybrid"}, "mode"),
        ({"status": "online", "bandwidth_mbps": -1}, "bandwidth_mbps"),
        ({"status": "online", "bandwidth_mbps": "fast"}, "bandwidth_mbps"),
        ({"mode": "split"}, "status"),
    ],
)
def test_bad_state_names_the_field(payload: dict, field: str) -> None:
    with pytest.raises(MqttSchemaError, match=field):
        DeviceState.from_json(json.dumps(payload))


@pytest.mark.parametrize(
    ("override", "field"),
    [({"head_ms": -0.1}, "head_ms"), ({"total_ms": True}, "total_ms"), ({"served_by": "fog"}, "served_by"),
     ({"tail_ms": "1"}, "tail_ms"), ({"request_id": ""}, "request_id"), ({"cut": 3}, "cut")],
)
def test_bad_record_names_the_field(override: dict, field: str) -> None:
    good = json.loads(TelemetryBatch((rec(),)).to_json())
    good["records"][0].update(override)
    with pytest.raises(MqttSchemaError, match=rf"records\[0\].*{field}"):
        TelemetryBatch.from_json(json.dumps(good))


def test_nan_and_garbage_are_refused() -> None:
    with pytest.raises(MqttSchemaError, match="total_ms"):
        TelemetryBatch.from_json('{"records":[{"request_id":"r","ts":1,"head_ms":0,"encode_ms":0,"network_ms":0,'
                                 '"queue_ms":0,"tail_ms":0,"total_ms":NaN,"served_by":"edge","cut":"c"}]}')
    with pytest.raises(MqttSchemaError, match="JSON"):
        TelemetryBatch.from_json(b"\xff\xfe")
    with pytest.raises(MqttSchemaError, match="object"):
        Ack.from_json("[1,2]")
    with pytest.raises(MqttSchemaError, match="dropped"):
        TelemetryBatch.from_json('{"records": [], "dropped": -1}')
    for bad in ('"a/b"', '7', '"' + "x" * 65 + '"'):
        with pytest.raises(MqttSchemaError, match="batch_id"):
            TelemetryBatch.from_json(f'{{"records": [], "batch_id": {bad}}}')


def test_command_fields_follow_the_kind() -> None:
    with pytest.raises(MqttSchemaError, match="cut"):
        Command.from_json('{"command_id": "x", "kind": "switch_cut"}')
    with pytest.raises(MqttSchemaError, match="mode"):
        Command.from_json('{"command_id": "x", "kind": "switch_mode", "mode": "turbo"}')
    with pytest.raises(MqttSchemaError, match="kind"):
        Command.from_json('{"command_id": "x", "kind": "reboot"}')
    with pytest.raises(MqttSchemaError, match="cut"):
        Command("ping", "x", cut="c1")


def test_device_id_with_a_trailing_newline_is_refused():
    from edge_agent.config import AgentConfig, ConfigError
    from protos.mqtt import MqttSchemaError, check_device_id, device_topic

    for bad in ("pi-1\n", "pi 1", "a" * 65, "", "pi/1", "pi+", "#"):
        with pytest.raises(MqttSchemaError):
            check_device_id(bad)
        with pytest.raises(MqttSchemaError):
            device_topic(bad, "state")
    with pytest.raises(ConfigError, match="device_id"):
        AgentConfig.from_dict({"bundle": "b", "cloud": "127.0.0.1:1", "device_id": "pi-1\n"}, "test")


@pytest.mark.parametrize("stage", ["total_ms", "tail_ms", "network_ms"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 86_400_001.0, 1e12])
def test_absurd_stage_times_are_refused(stage: str, value: float) -> None:
    with pytest.raises(MqttSchemaError) as err:
        rec(**{stage: value})
    assert err.value.key == stage
    payload = json.dumps({"records": [{**rec().to_dict(), stage: value}]})
    with pytest.raises(MqttSchemaError):
        TelemetryBatch.from_json(payload)


def topic(device: str, leaf: str) -> str:
    return device_topic(device, leaf)


@pytest.mark.parametrize("identity,access,target,allowed", [
    ("cam1", "write", topic("cam1", STATE), True),
    ("cam1", "write", topic("cam1", TELEMETRY), True),
    ("cam1", "write", topic("cam1", ACK), True),
    ("cam1", "write", topic("cam1", CMD), False),  # a device never commands, not even itself
    ("cam1", "write", topic("cam2", STATE), False),
    ("cam1", "write", topic("cam2", TELEMETRY), False),
    ("cam1", "write", topic("cam2", ACK), False),
    ("cam1", "read", topic("cam1", CMD), True),
    ("cam1", "subscribe", topic("cam1", CMD), True),
    ("cam1", "read", topic("cam2", CMD), False),
    ("cam1", "read", topic("cam1", STATE), False),
    ("cam1", "subscribe", "#", False),
    ("cam1", "subscribe", "splitinfer/v1/devices/+/cmd", False),
    ("cam1", "subscribe", "splitinfer/v1/devices/cam1/#", False),
    ("cam1", "subscribe", "splitinfer/v1/devices/cam1/+", False),
    ("+", "write", topic("cam1", STATE).replace("cam1", "+"), False),
    ("#", "subscribe", "#", False),
    (CONTROLLER, "write", topic("cam1", CMD), True),
    (CONTROLLER, "write", topic("cam1", STATE), False),
    (CONTROLLER, "write", topic("cam1", TELEMETRY), False),
    (CONTROLLER, "subscribe", fleet_filter(STATE), True),
    (CONTROLLER, "subscribe", fleet_filter(TELEMETRY), True),
    (CONTROLLER, "subscribe", fleet_filter(ACK), True),
    (CONTROLLER, "subscribe", "splitinfer/v1/devices/#", True),
    (CONTROLLER, "subscribe", "#", False),
    (CONTROLLER, "read", topic("cam9", TELEMETRY), True),
    (CONTROLLER, "read", "other/topic", False),
    (None, "read", topic("cam1", CMD), False),
    ("dashboard", "read", topic("cam1", STATE), False),  # a device id like any other: its own topics only
    ("dashboard", "read", topic("cam1", CMD), False),
    ("cam1", "delete", topic("cam1", STATE), False),
])
def test_acl(identity: str | None, access: str, target: str, allowed: bool) -> None:
    assert acl_allows(identity, access, target) is allowed


def test_mosquitto_acl_has_the_same_rules() -> None:
    lines = [ln for ln in mosquitto_acl().splitlines() if ln and not ln.startswith("#")]
    assert lines == [
        "user controller",
        "topic write splitinfer/v1/devices/+/cmd",
        "topic read splitinfer/v1/devices/#",
        "pattern write splitinfer/v1/devices/%u/state",
        "pattern write splitinfer/v1/devices/%u/telemetry",
        "pattern write splitinfer/v1/devices/%u/cmd/ack",
        "pattern read splitinfer/v1/devices/%u/cmd",
    ]


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True),
                                       ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                       ("broker.example", False)])
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop
