"""mTLS on the gRPC tier, on loopback with real servers and agents: who may call it, as whom, and what the agent
does when it is refused (finishes every request on the device); --insecure only on loopback; SIGHUP reloads
the server certificate; the `split-cloud ca / enroll / revoke` commands end to end."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.importorskip("cryptography")

from cloud_tier import CloudServer  # noqa: E402
from cloud_tier import cli as cloud_cli  # noqa: E402
from cloud_tier.lab.process import CHECKOUT, CloudProcess, child_env  # noqa: E402
from cloud_tier.pki import CertificateAuthority, load_crl_serials, serial_of  # noqa: E402
from edge_agent import CLOUD, EDGE, EdgeAgent  # noqa: E402
from edge_agent import cli as agent_cli  # noqa: E402
from edge_agent.config import AgentConfig, ConfigError, TlsConfig  # noqa: E402
from models.tiny_bundle import CUT_TENSOR, MID_CUT, make_tiny_bundle, sample_input  # noqa: E402
from protos import codec  # noqa: E402
from protos import inference_pb2 as pb  # noqa: E402
from protos import inference_pb2_grpc as pb_grpc  # noqa: E402
from tests import polling  # noqa: E402

DEADLINE_S = 30.0
OK, PERMISSION_DENIED = 0, grpc.StatusCode.PERMISSION_DENIED.value[0]


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls-bundles")
    make_tiny_bundle(root / "tiny")
    return root


@pytest.fixture(scope="module")
def server(bundles_dir: Path) -> Iterator[CloudServer]:
    """The tier with its defaults: mTLS with the session CA (STATE/pki)."""
    with CloudServer(bundles_dir, max_batch=4, max_wait_ms=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def activation(bundles_dir: Path) -> np.ndarray:
    import onnxruntime as ort

    head = ort.InferenceSession(str(bundles_dir / "tiny" / "head.onnx"), providers=["CPUExecutionProvider"])
    return head.run(None, {"input": sample_input(1, 7)})[0]


def _request(rid: str, device_id: str, activation: np.ndarray) -> pb.InferRequest:
    return pb.InferRequest(request_id=rid, device_id=device_id, model="tiny", cut=MID_CUT,
                           tensors=[codec.encode(CUT_TENSOR, activation, "fp32")])


def _channel(address: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                         cert.read_bytes() if cert else None)
    return grpc.secure_channel(address, creds)


def _agent(bundles_dir: Path, address: str, **fields) -> EdgeAgent:
    fields.setdefault("connect_timeout_s", 1.0)
    fields.setdefault("backoff", {"initial_s": 0.05, "max_s": 0.3})
    fields.setdefault("probe_count", 1)
    fields.setdefault("deadline_ms", 5000)
    return EdgeAgent.from_bundle(bundles_dir / "tiny", address, **fields)


def _feed(agent: EdgeAgent, n: int) -> list:
    futures = [agent.submit(sample_input(1, i)) for i in range(n)]
    return [f.result(timeout=DEADLINE_S) for f in futures]  # every request gets a result: none lost


# -- who may call -----------------------------------------------------------------------------------------------


def test_an_agent_with_its_certificate_is_served_by_the_cloud(bundles_dir, server, device_tls) -> None:
    with _agent(bundles_dir, server.address, device_id="cam-ok", tls=device_tls("cam-ok")) as agent:
        assert agent.wait_for_mode("split", DEADLINE_S), agent.stats()
        results = _feed(agent, 8)
    assert [r.served_by for r in results] == [CLOUD] * 8
    assert server.counters is not None and server.counters.devices()["cam-ok"]["requests"] >= 8


def test_a_client_without_a_certificate_fails_the_handshake(server, pki) -> None:
    with _channel(server.address, pki.ca_cert) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_of_another_ca_fails_the_handshake_and_the_agent_runs_locally(
        bundles_dir, server, pki, tmp_path) -> None:
    other = CertificateAuthority.init(tmp_path / "other-ca")
    folder = other.enroll("cam-other", tmp_path / "cam-other")
    with _channel(server.address, pki.ca_cert, folder / "device.pem", folder / "device.key") as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # the agent trusts the right CA but holds a certificate the tier does not: every request ends on the device
    tls = TlsConfig(ca=pki.ca_cert, cert=folder / "device.pem", key=folder / "device.key")
    with _agent(bundles_dir, server.address, device_id="cam-other", tls=tls) as agent:
        results = _feed(agent, 5)
    assert [r.served_by for r in results] == [EDGE] * 5


def test_a_server_of_another_ca_is_not_trusted_by_the_agent(bundles_dir, server, device_tls, tmp_path) -> None:
    other = CertificateAuthority.init(tmp_path / "other-ca")
    mine = device_tls("cam-trust")
    with _agent(bundles_dir, server.address, device_id="cam-trust",
                tls=TlsConfig(ca=other.ca_cert, cert=mine.cert, key=mine.key)) as agent:
        results = _feed(agent, 3)
        assert agent.stats().served_cloud == 0
    assert [r.served_by for r in results] == [EDGE] * 3


def test_the_server_name_is_checked(bundles_dir, server, device_tls) -> None:
    tls = device_tls("cam-name")
    wrong = TlsConfig(ca=tls.ca, cert=tls.cert, key=tls.key, server_name="cloud.elsewhere.example")
    with _agent(bundles_dir, server.address, device_id="cam-name", tls=wrong) as agent:
        assert [r.served_by for r in _feed(agent, 2)] == [EDGE] * 2
    right = TlsConfig(ca=tls.ca, cert=tls.cert, key=tls.key, server_name="localhost")  # a SAN of ca init's default
    with _agent(bundles_dir, server.address, device_id="cam-name", tls=right) as agent:
        assert agent.wait_for_mode("split", DEADLINE_S)
        assert [r.served_by for r in _feed(agent, 2)] == [CLOUD] * 2


# -- as whom ----------------------------------------------------------------------------------------------------


def test_a_request_claiming_another_device_is_denied_and_the_stream_goes_on(server, device_tls, activation) -> None:
    tls = device_tls("cam-a")
    before = server.stats.snapshot().get("device_id_mismatches", 0)
    with _channel(server.address, tls.ca, tls.cert, tls.key) as channel:
        replies = {r.request_id: r for r in pb_grpc.SplitInferenceStub(channel).Infer(
            iter([_request("mine", "cam-a", activation), _request("forged", "cam1", activation),
                  _request("mine-again", "cam-a", activation)]), timeout=DEADLINE_S)}
    assert replies["mine"].status.code == OK and replies["mine-again"].status.code == OK
    assert replies["forged"].status.code == PERMISSION_DENIED and "cam-a" in replies["forged"].status.message
    assert server.stats.snapshot()["device_id_mismatches"] == before + 1
    assert "cam1" not in (server.counters.devices() if server.counters else {})  # the forged id is nowhere


def test_an_agent_configured_with_another_devices_id_finishes_on_the_device(bundles_dir, server, device_tls) -> None:
    with _agent(bundles_dir, server.address, device_id="cam-b", tls=device_tls("cam-c")) as agent:
        results = _feed(agent, 4)
    assert all(r.served_by == EDGE for r in results)
    assert any("PERMISSION_DENIED" in (r.fallback_reason or "") for r in results), [r.fallback_reason for r in results]


def test_the_dashboards_certificate_may_not_call_infer(server, pki, activation) -> None:
    cert, key = pki.client_files("dashboard")
    with _channel(server.address, pki.ca_cert, cert, key) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.SplitInferenceStub(channel).Infer(iter([_request("x", "dashboard", activation)]),
                                                            timeout=DEADLINE_S))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_device_revoked_while_the_server_runs_is_refused_at_once(
        bundles_dir, server, pki, device_tls, activation) -> None:
    tls = device_tls("cam-revoked")
    with _agent(bundles_dir, server.address, device_id="cam-revoked", tls=tls) as agent:
        assert agent.wait_for_mode("split", DEADLINE_S)
        assert [r.served_by for r in _feed(agent, 3)] == [CLOUD] * 3
        pki.revoke("cam-revoked")  # what `split-cloud revoke` does: the CRL file changes, no restart
        polling.wait_for(lambda: agent.infer(sample_input(1, 9), timeout=DEADLINE_S).served_by == EDGE,
                         "the revoked device's requests to end on the device", DEADLINE_S, interval_s=0.2)
        results = _feed(agent, 6)  # refused by the cloud, finished on the device: none lost
        assert [r.served_by for r in results] == [EDGE] * 6
    with _channel(server.address, tls.ca, tls.cert, tls.key) as channel:  # a new stream is refused as a whole
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.SplitInferenceStub(channel).Infer(iter([_request("r", "cam-revoked", activation)]),
                                                            timeout=DEADLINE_S))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (err.value.details() or "")
    with _channel(server.address, tls.ca, tls.cert, tls.key) as channel:  # nor may it list the served models
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SplitInferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (err.value.details() or "")


# -- the agent's configuration ----------------------------------------------------------------------------------


def test_an_agent_without_tls_or_insecure_is_a_config_error_naming_both(bundles_dir) -> None:
    with pytest.raises(ConfigError) as err:
        EdgeAgent.from_bundle(bundles_dir / "tiny", "127.0.0.1:1")
    assert "[tls]" in str(err.value) and "insecure" in str(err.value)


def test_split_agent_without_tls_exits_2_naming_both_ways_out(bundles_dir, capsys) -> None:
    rc = agent_cli.main(["run", "--bundle", str(bundles_dir / "tiny"), "--cloud", "127.0.0.1:1", "--count", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--tls-ca" in err[0] and "--insecure" in err[0], err


def test_split_agent_insecure_is_refused_off_loopback_without_i_know_insecure(bundles_dir, capsys) -> None:
    # A name that resolves nowhere (RFC 2606): refused by the config check before anything is dialled.
    args = ["run", "--bundle", str(bundles_dir / "tiny"), "--cloud", "cloud.invalid:50051", "--insecure",
            "--count", "1"]
    assert agent_cli.main(args) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_an_insecure_agent_and_server_work_on_loopback(bundles_dir) -> None:
    with CloudServer(bundles_dir, insecure=True) as srv, _agent(bundles_dir, srv.address, insecure=True) as agent:
        assert agent.wait_for_mode("split", DEADLINE_S)
        assert agent.infer(sample_input(), timeout=DEADLINE_S).served_by == CLOUD
        assert srv.insecure


# -- split-cloud serve ------------------------------------------------------------------------------------------


def test_serve_insecure_on_a_non_loopback_address_exits_2(bundles_dir) -> None:
    proc = CloudProcess(bundles_dir, "--no-fleet", "--cpu-only", host="0.0.0.0", insecure=True, start_timeout=30.0)
    with pytest.raises(RuntimeError, match="exited with 2") as err:
        proc.start()
    assert "--i-know-insecure" in str(err.value)


def test_serve_insecure_warns_and_serves_plaintext(bundles_dir, activation) -> None:
    with CloudProcess(bundles_dir, "--no-fleet", "--cpu-only", insecure=True, start_timeout=30.0) as proc:
        with grpc.insecure_channel(proc.address) as channel:
            replies = list(pb_grpc.SplitInferenceStub(channel).Infer(iter([_request("p", "any-id", activation)]),
                                                                      timeout=DEADLINE_S))
        assert replies[0].status.code == OK
        assert proc.terminate() == 0
    out = "".join(_drain(proc))
    assert "WARNING:" in out and "plaintext and unauthenticated" in out


def test_serve_without_a_ca_names_ca_init_and_exits_2(bundles_dir, tmp_path) -> None:
    proc = CloudProcess(bundles_dir, "--no-fleet", "--cpu-only", pki=tmp_path / "none", start_timeout=30.0)
    with pytest.raises(RuntimeError, match="exited with 2") as err:
        proc.start()
    assert "split-cloud ca init" in str(err.value)


def _drain(proc: CloudProcess) -> list[str]:
    out = []
    while (line := proc.lines.get(timeout=DEADLINE_S)) is not None:
        out.append(line)
    return out


def _server_serial(port: int, ca: Path, cert: Path, key: Path) -> int:
    """The serial of the certificate the server presents to a new connection (Python's ssl, with ALPN h2)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    return int(x509.load_der_x509_certificate(der).serial_number)


def test_sighup_reloads_the_server_certificate(bundles_dir, tmp_path) -> None:
    ca = CertificateAuthority.init(tmp_path / "pki")
    device = ca.enroll("cam-hup", tmp_path / "cam-hup")
    files = (ca.ca_cert, device / "device.pem", device / "device.key")
    with CloudProcess(bundles_dir, "--no-fleet", "--cpu-only", pki=ca.dir, start_timeout=30.0) as proc:
        assert proc.port is not None
        first = _server_serial(proc.port, *files)
        assert first == serial_of(ca.server_cert.read_bytes())
        ca.issue_server(["localhost", "127.0.0.1"])
        renewed = serial_of(ca.server_cert.read_bytes())
        assert _server_serial(proc.port, *files) == first  # nothing changes before the signal
        proc.reload_certificates()
        polling.wait_for(lambda: _server_serial(proc.port, *files) == renewed,
                         "a new connection to see the re-issued certificate", DEADLINE_S, interval_s=0.1)
        with _channel(proc.address, *files) as channel:  # and gRPC works with it
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert proc.terminate() == 0


# -- split-cloud ca / enroll / revoke ---------------------------------------------------------------------------


def test_ca_enroll_and_revoke_commands_end_to_end(tmp_path, capsys) -> None:
    pki = tmp_path / "pki"
    done = subprocess.run([sys.executable, "-m", "cloud_tier.cli", "ca", "init", "--dir", str(pki), "--host",
                           "cloud.example", "--host", "10.0.0.5"], capture_output=True, text=True, env=child_env(),
                          cwd=CHECKOUT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (pki / "ca.pem").is_file() and (pki / "server.pem").is_file() and "ca init" not in done.stderr
    from cryptography import x509

    san = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "cloud.example" in san.get_values_for_type(x509.DNSName)
    assert cloud_cli.main(["ca", "init", "--dir", str(pki)]) == 2  # an existing CA is not replaced
    assert "already holds a CA" in capsys.readouterr().err

    out = tmp_path / "cam-9"
    assert cloud_cli.main(["enroll", "cam-9", "--pki", str(pki), "--out", str(out), "--cloud", "cloud.example:50051",
                           "--broker", "cloud.example:8883", "--days", "30"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["agent.toml", "ca.pem", "device.key", "device.pem"]
    cfg = AgentConfig.from_toml(out / "agent.toml")  # the stub loads as it is, its [tls] files beside it
    assert cfg.device_id == "cam-9" and cfg.cloud == "cloud.example:50051" and cfg.check_transport() == "tls"
    assert cfg.tls is not None and cfg.tls.cert == out / "device.pem" and cfg.mqtt is not None
    serial = serial_of((out / "device.pem").read_bytes())
    assert cloud_cli.main(["enroll", "cam-9", "--pki", str(pki), "--out", str(out)]) == 2  # a key is not replaced
    capsys.readouterr()

    for bad in (["enroll", "cam#9", "--pki", str(pki)], ["enroll", "cam-8", "--pki", str(pki), "--cloud", "nohost"],
                ["enroll", "cam-8", "--pki", str(tmp_path / "no-ca")], ["revoke", "cam-unknown", "--pki", str(pki)]):
        assert cloud_cli.main(bad) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("split-cloud: "), (bad, err)

    assert cloud_cli.main(["revoke", "cam-9", "--pki", str(pki)]) == 0
    assert serial in load_crl_serials(pki / "crl.pem", pki / "ca.pem")
    assert f"{serial:x}" in capsys.readouterr().out


def test_enroll_without_addresses_points_agent_toml_at_the_stable_ports(pki, tmp_path) -> None:
    out = tmp_path / "cam-s"
    assert cloud_cli.main(["enroll", "cam-s", "--pki", str(pki.dir), "--out", str(out)]) == 0
    cfg = AgentConfig.from_toml(out / "agent.toml")
    assert cfg.cloud == "CLOUD_HOST:50051" and cfg.mqtt is not None and cfg.mqtt.broker == "CLOUD_HOST:8883"
    out = tmp_path / "cam-t"
    assert cloud_cli.main(["enroll", "cam-t", "--pki", str(pki.dir), "--out", str(out), "--cloud",
                           "cloud.example:6000"]) == 0
    cfg = AgentConfig.from_toml(out / "agent.toml")  # the broker on the cloud's host, at the embedded broker's port
    assert cfg.cloud == "cloud.example:6000" and cfg.mqtt is not None and cfg.mqtt.broker == "cloud.example:8883"
