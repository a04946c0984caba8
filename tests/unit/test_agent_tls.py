"""The agent's transport security settings: [tls] (paths relative to the file), insecure, and the one error when
neither is given."""

from __future__ import annotations

import pytest

from edge_agent.config import AgentConfig, ConfigError, TlsConfig


def test_tls_paths_are_relative_to_the_config_file(tmp_path) -> None:
    path = tmp_path / "dev" / "agent.toml"
    path.parent.mkdir()
    path.write_text('bundle = "b"\ncloud = "cloud.example:50051"\n[tls]\nca = "ca.pem"\ncert = "device.pem"\n'
                    'key = "/abs/device.key"\nserver_name = "cloud.internal"\n')
    cfg = AgentConfig.from_toml(path)
    assert cfg.tls == TlsConfig(ca=path.parent / "ca.pem", cert=path.parent / "device.pem",
                                key="/abs/device.key", server_name="cloud.internal")
    assert cfg.check_transport() == "tls"


def test_neither_tls_nor_insecure_is_one_error_naming_both() -> None:
    cfg = AgentConfig(bundle="b")  # a config may be made without either; dialing the cloud needs one
    with pytest.raises(ConfigError) as err:
        cfg.check_transport()
    assert "[tls]" in str(err.value) and "insecure = true" in str(err.value) and "--tls-cert" in str(err.value)


@pytest.mark.parametrize("cloud,ok", [("127.0.0.1:1", True), ("localhost:1", True), ("[::1]:1", True),
                                      ("10.0.0.5:1", False), ("cloud.example:1", False)])
def test_insecure_is_for_loopback_unless_i_know_insecure(cloud, ok) -> None:
    cfg = AgentConfig(bundle="b", cloud=cloud, insecure=True)
    if ok:
        assert cfg.check_transport() == "insecure"
    else:
        with pytest.raises(ConfigError, match="not a loopback address"):
            cfg.check_transport()
        assert cfg.replace(i_know_insecure=True).check_transport() == "insecure"


def test_bad_tls_settings_name_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="tls.cert"):
        AgentConfig.from_dict({"bundle": "b", "tls": {"ca": "ca.pem", "key": "k"}})
    with pytest.raises(ConfigError, match="tls.bogus"):
        AgentConfig.from_dict({"bundle": "b", "tls": {"ca": "a", "cert": "b", "key": "c", "bogus": 1}})
    with pytest.raises(ConfigError, match="insecure"):
        AgentConfig.from_dict({"bundle": "b", "insecure": True, "tls": {"ca": "a", "cert": "b", "key": "c"}})
    with pytest.raises(ConfigError, match="tls.ca"):
        TlsConfig(ca=tmp_path / "missing.pem", cert=tmp_path / "c", key=tmp_path / "k").read()
    (tmp_path / "x.pem").write_text("not a pem")
    with pytest.raises(ConfigError, match="not a PEM"):
        TlsConfig(ca=tmp_path / "x.pem", cert=tmp_path / "x.pem", key=tmp_path / "x.pem").read()
