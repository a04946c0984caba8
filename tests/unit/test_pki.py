"""The deployment's CA: identities in certificates, private keys 0600, revocation on the CRL."""

from __future__ import annotations

import stat

import pytest

pytest.importorskip("cryptography")

from cloud_tier.pki import CertificateAuthority, Identity, PkiError, identity_of, load_crl_serials, serial_of  # noqa: E402


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "pki", ["localhost", "127.0.0.1"])


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_the_ca_the_server_and_the_control_certificates_with_private_keys(ca) -> None:
    assert _mode(ca.ca_key) == 0o600 and _mode(ca.server_key) == 0o600 and _mode(ca.token_file) == 0o600
    assert _mode(ca.dir) == 0o711  # not listable; the public files readable by name (a broker's own user)
    for kind in ("controller", "dashboard"):
        cert, key = ca.client_files(kind)
        assert identity_of(cert.read_bytes()) == Identity(kind, kind) and _mode(key) == 0o600
    assert identity_of(ca.server_cert.read_bytes()) is None  # the server holds no client identity
    assert load_crl_serials(ca.crl) == frozenset()


def test_init_refuses_to_replace_an_existing_ca(ca) -> None:
    with pytest.raises(PkiError, match="already holds a CA"):
        CertificateAuthority.init(ca.dir, ["localhost"])


def test_enroll_writes_a_device_folder_whose_certificate_names_the_device(ca, tmp_path) -> None:
    out = ca.enroll("cam-7", tmp_path / "cam-7", cloud="cloud.example:50051", broker="cloud.example:8883")
    assert sorted(p.name for p in out.iterdir()) == ["agent.toml", "ca.pem", "device.key", "device.pem"]
    assert identity_of((out / "device.pem").read_bytes()) == Identity("device", "cam-7")
    assert _mode(out / "device.key") == 0o600
    toml = (out / "agent.toml").read_text()
    assert 'device_id = "cam-7"' in toml and 'cloud = "cloud.example:50051"' in toml and "[tls]" in toml


@pytest.mark.parametrize("bad", ["a/b", "cam#1", "cam+", "", "x" * 65, "cam 1", "controller", "dashboard"])
def test_enroll_refuses_ids_that_could_reach_an_mqtt_acl(ca, tmp_path, bad) -> None:
    with pytest.raises(PkiError, match="device id .* is (invalid|reserved)"):
        ca.enroll(bad, tmp_path / "d")


def test_revoke_puts_the_devices_certificates_on_the_crl(ca, tmp_path) -> None:
    out = ca.enroll("cam-r", tmp_path / "cam-r")
    serial = serial_of((out / "device.pem").read_bytes())
    assert serial not in ca.revoked_serials()
    assert ca.revoke("cam-r") == [serial]
    assert serial in ca.revoked_serials() and serial in load_crl_serials(ca.crl)
    with pytest.raises(PkiError, match="already revoked"):
        ca.revoke("cam-r")
    with pytest.raises(PkiError, match="no certificate was issued"):
        ca.revoke("never-enrolled")


def test_a_folder_that_is_not_a_ca_is_named(tmp_path) -> None:
    with pytest.raises(PkiError, match="split-cloud ca init"):
        CertificateAuthority(tmp_path)
