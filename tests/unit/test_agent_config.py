"""AgentConfig: defaults, TOML loading, overrides, and errors that name the key and what was expected."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

import edge_agent.config as config_module
from edge_agent.config import AgentConfig, BackoffConfig, ConfigError, describe, merge_overrides, parse_address


def test_defaults_and_types():
    cfg = AgentConfig(bundle="b")
    assert cfg.bundle == Path("b") and cfg.head_precision == "int8" and cfg.codec == "auto"
    assert cfg.cut is None and cfg.deadline_ms > 0 and cfg.max_in_flight >= 1
    assert cfg.backoff == BackoffConfig() and cfg.input.source == "synthetic"


def test_toml_file_with_tables_and_relative_bundle(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        'bundle = "bundles/tiny"\ncloud = "10.0.0.5:50051"\ndevice_id = "pi-kitchen_1"\ncut = "c1"\n'
        'codec = "int8+zstd"\ndeadline_ms = 250\nproviders = ["CPUExecutionProvider"]\n'
        "[backoff]\ninitial_s = 0.5\nmax_s = 4\n[input]\nsource = \"synthetic\"\nrate = 20\ncount = 7\n"
    )
    cfg = AgentConfig.from_toml(path)
    assert cfg.bundle == tmp_path / "bundles" / "tiny"  # relative to the file, not the cwd
    assert cfg.cloud == "10.0.0.5:50051" and cfg.device_id == "pi-kitchen_1" and cfg.cut == "c1"
    assert cfg.codec == "int8+zstd" and cfg.deadline_ms == 250
    assert cfg.backoff.initial_s == 0.5 and cfg.backoff.max_s == 4.0 and cfg.input.count == 7
    over = AgentConfig.from_toml(path, {"cloud": "127.0.0.1:9", "input.rate": 0, "backoff.max_s": 8})
    assert over.cloud == "127.0.0.1:9" and over.input.rate == 0 and over.backoff.max_s == 8
    assert over.input.count == 7  # the rest of the table stays


@pytest.mark.parametrize(
    "data,key,expected",
    [
        ({"cloud": "nohost"}, "cloud", '"host:port"'),
        ({"cloud": "h:70000"}, "cloud", "1..65535"),
        ({"device_id": "a b"}, "device_id", "A-Za-z0-9_-"),
        ({"device_id": "x" * 65}, "device_id", "1-64"),
        ({"head_precision": "int4"}, "head_precision", "['int8', 'fp32']"),
        ({"codec": "int4"}, "codec", "int8+zstd"),
        ({"deadline_ms": 0}, "deadline_ms", "integer in [1,"),
        ({"deadline_ms": 1.5}, "deadline_ms", "an integer"),
        ({"max_in_flight": True}, "max_in_flight", "an integer"),
        ({"probe_count": 0}, "probe_count", "[1, 1000]"),
        ({"keepalive_s": -1}, "keepalive_s", "> 0"),
        ({"providers": "CPUExecutionProvider"}, "providers", "list"),
        ({"backoff": {"jitter": 2}}, "backoff.jitter", "<= 1.0"),
        ({"backoff": {"initial_s": 5, "max_s": 1}}, "backoff.max_s", ">= initial_s"),
        ({"backoff": {"delay": 1}}, "backoff.delay", "unknown key"),
        ({"backoff": 3}, "backoff", "[backoff] table"),
        ({"input": {"rate": -1}}, "input.rate", ">= 0"),
        ({"input": {"count": "many"}}, "input.count", "an integer"),
        ({"deadline": 5}, "deadline", "unknown key; expected one of"),
    ],
)
def test_bad_values_name_the_key_and_the_expectation(data, key, expected):
    with pytest.raises(ConfigError) as err:
        AgentConfig.from_dict({"bundle": "b", **data}, source="agent.toml")
    assert err.value.key == key
    assert str(err.value).startswith(f"agent.toml: key {key!r}:") and expected in str(err.value)


def test_bundle_is_required_and_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="'bundle': is required"):
        AgentConfig.from_dict({})
    with pytest.raises(ConfigError, match="config file not found"):
        AgentConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("bundle = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        AgentConfig.from_toml(bad)


def test_parse_address():
    assert parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_address("[::1]:8") == ("[::1]", 8)
    assert parse_address("cloud-1.example:443") == ("cloud-1.example", 443)
    with pytest.raises(ConfigError):
        parse_address("127.0.0.1")


def test_merge_overrides_and_describe():
    merged = merge_overrides({"input": {"count": 3}}, {"input.rate": 5.0, "cut": None, "cloud": "h:1"})
    assert merged == {"input": {"count": 3, "rate": 5.0}, "cloud": "h:1"}
    keys = describe()
    assert "backoff.jitter" in keys and "input.source" in keys and all(keys.values())


def test_replace_validates_again():
    cfg = AgentConfig(bundle="b")
    assert cfg.replace(deadline_ms=5).deadline_ms == 5
    with pytest.raises(ConfigError, match="deadline_ms"):
        cfg.replace(deadline_ms=-5)


def test_loads_without_tomllib_on_python_3_10(tmp_path, monkeypatch):
    """Python 3.10 has no `tomllib`: the config module falls back to `tomli` (the [edge] extra's backport)."""
    # The real parser stands in for tomli (the same API); on a real 3.10 it is tomli itself.
    real_toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ImportError, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", real_toml)
    # A fresh copy of the module (the imported one, and the classes other tests hold, stay as they are).
    spec = importlib.util.spec_from_file_location("edge_agent_config_py310", config_module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # dataclasses look their module up there
    spec.loader.exec_module(fresh)
    path = tmp_path / "agent.toml"
    path.write_text('bundle = "b"\ndeadline_ms = 250\n')
    assert fresh.AgentConfig.from_toml(path).deadline_ms == 250
    assert fresh.tomllib is real_toml


def test_mqtt_tls_files_come_together_and_resolve_against_the_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('bundle = "b"\n[mqtt]\nbroker = "10.0.0.5:8883"\ntls_ca = "pki/ca.pem"\n'
                    'tls_cert = "pki/device.pem"\ntls_key = "/abs/device.key"\n')
    mqtt = AgentConfig.from_toml(path).mqtt
    assert mqtt is not None and mqtt.tls == (str(tmp_path / "pki/ca.pem"), str(tmp_path / "pki/device.pem"),
                                             "/abs/device.key")
    assert mqtt.i_know_insecure is False
    with pytest.raises(ConfigError) as err:
        AgentConfig.from_dict({"bundle": "b", "mqtt": {"broker": "h:1", "tls_ca": "ca.pem"}}, source="agent.toml")
    assert err.value.key == "mqtt.tls_cert" and "the CA, the device's certificate and its key" in str(err.value)
    with pytest.raises(ConfigError) as err:
        AgentConfig.from_dict({"bundle": "b", "mqtt": {"broker": "h:1", "i_know_insecure": "yes"}}, source="a.toml")
    assert err.value.key == "mqtt.i_know_insecure"
    assert AgentConfig.from_dict({"bundle": "b", "mqtt": {"broker": "h:1"}}).mqtt.tls is None  # type: ignore[union-attr]


def test_service_table_defaults_and_keys(tmp_path):
    cfg = AgentConfig(bundle="b")
    assert cfg.service.socket == "/run/splitinfer-agent/agent.sock" and cfg.service.socket_permissions == 0o660
    assert cfg.service.listen == "" and cfg.service.max_requests == 0 and cfg.service.log_level == "INFO"
    path = tmp_path / "agent.toml"
    path.write_text('bundle = "b"\n[service]\nlisten = "127.0.0.1:7000"\nmax_requests = 4\n'
                    'request_timeout_s = 2.5\ndrain_timeout_s = 9\nsocket_mode = "0600"\nlog_level = "DEBUG"\n')
    svc = AgentConfig.from_toml(path).service
    assert (svc.listen, svc.max_requests, svc.request_timeout_s, svc.drain_timeout_s, svc.socket_permissions,
            svc.log_level) == ("127.0.0.1:7000", 4, 2.5, 9.0, 0o600, "DEBUG")
    assert "service.socket" in describe() and "service.drain_timeout_s" in describe()


@pytest.mark.parametrize(
    "service,key,expected",
    [
        ({"listen": "0.0.0.0:7000"}, "service.listen", "not a loopback address"),
        ({"listen": "nohost"}, "service.listen", "host:port"),
        ({"socket": "relative.sock"}, "service.socket", "absolute path"),
        ({"socket": "/" + "x" * 200}, "service.socket", "at most 107 characters"),
        ({"socket_mode": "07x7"}, "service.socket_mode", "octal permissions"),
        ({"socket_mode": "0066"}, "service.socket_mode", "owner rw"),
        ({"max_requests": -1}, "service.max_requests", "in [0, 100000]"),
        ({"request_timeout_s": 0}, "service.request_timeout_s", "> 0.0"),
        ({"log_level": "LOUD"}, "service.log_level", "expected one of"),
        ({"sockett": "/x"}, "service.sockett", "unknown key"),
    ],
)
def test_bad_service_keys_name_the_key(service, key, expected):
    with pytest.raises(ConfigError) as err:
        AgentConfig.from_dict({"bundle": "b", "service": service})
    assert err.value.key == key and expected in str(err.value), str(err.value)


def test_a_remote_listen_address_needs_allow_remote():
    cfg = AgentConfig.from_dict({"bundle": "b", "service": {"listen": "10.0.0.5:7000", "allow_remote": True}})
    assert cfg.service.listen == "10.0.0.5:7000"
