"""The gRPC tier's mTLS pieces without a server: the revocation list watched with an injected clock, and the
per-request identity check."""

from __future__ import annotations

import pytest

pytest.importorskip("cryptography")

from cloud_tier.pki import CertificateAuthority, serial_of  # noqa: E402
from cloud_tier.stats import ServerStats  # noqa: E402
from cloud_tier.tls import Peer, PeerGuard, Revocations, ServerTls  # noqa: E402
from protos import inference_pb2 as pb  # noqa: E402

PERMISSION_DENIED = 7


@pytest.fixture()
def ca(tmp_path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "pki")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_revocation_is_seen_once_the_interval_has_passed(ca, tmp_path) -> None:
    serial = serial_of((ca.enroll("cam-1", tmp_path / "cam-1") / "device.pem").read_bytes())
    clock = Clock()
    crl = Revocations(ca.crl, ca.ca_cert, interval_s=1.0, clock=clock)
    assert not crl.is_revoked(serial)
    ca.revoke("cam-1")
    clock.now = 0.5
    assert not crl.is_revoked(serial)  # the file is looked at no more than once a second
    clock.now = 1.0
    assert crl.is_revoked(serial) and crl.reloads == 2


def test_a_damaged_or_missing_crl_keeps_the_last_good_list(ca, tmp_path) -> None:
    ca.enroll("cam-2", tmp_path / "cam-2")
    (serial,) = ca.revoke("cam-2")
    clock = Clock()
    crl = Revocations(ca.crl, ca.ca_cert, clock=clock)
    ca.crl.write_text("-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    clock.now = 5.0
    assert crl.is_revoked(serial)
    ca.crl.unlink()
    clock.now = 10.0
    assert crl.is_revoked(serial)


def test_a_crl_signed_by_another_ca_is_refused_at_start(ca, tmp_path) -> None:
    other = CertificateAuthority.init(tmp_path / "other")
    with pytest.raises(Exception, match="not signed"):
        Revocations(other.crl, ca.ca_cert)


def test_requests_must_claim_the_peers_device_id(ca, tmp_path) -> None:
    stats = ServerStats()
    guard = PeerGuard(Revocations(ca.crl, ca.ca_cert), stats)
    peer = Peer("device", "cam-3", 1234)
    assert guard.refuse(pb.InferRequest(request_id="a", device_id="cam-3"), peer) is None
    unnamed = pb.InferRequest(request_id="b")
    assert guard.refuse(unnamed, peer) is None and unnamed.device_id == "cam-3"  # filled in from the certificate
    denied = guard.refuse(pb.InferRequest(request_id="c", device_id="cam-4"), peer)
    assert denied is not None and denied.request_id == "c" and denied.status.code == PERMISSION_DENIED
    assert "cam-3" in denied.status.message
    snap = stats.snapshot()
    assert snap["device_id_mismatches"] == 1 and snap["errors"] == {"PERMISSION_DENIED": 1}


def test_server_tls_names_ca_init_when_the_folder_is_empty(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="split-cloud ca init"):
        ServerTls(tmp_path)


def test_server_tls_rereads_its_files_only_after_reload(ca) -> None:
    tls = ServerTls(ca.dir)
    assert tls._fetch() is None and tls.loads == 1
    ca.issue_server(["localhost"])
    assert tls._fetch() is None  # a changed file alone changes nothing: SIGHUP does
    tls.reload()
    assert tls._fetch() is not None and tls.loads == 2
    assert tls._fetch() is None
