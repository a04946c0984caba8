"""One small certificate authority per deployment: the CA, the cloud's server certificate, one certificate per
device, the controller's and the dashboard's, and a revocation list that gRPC and the brokers honour.

Identity lives in the certificate, never in what a client claims: a device certificate has CN = the device id
and the SAN URI `spiffe://splitinfer/device/<id>`; the controller's `spiffe://splitinfer/controller`, the
dashboard's `spiffe://splitinfer/dashboard`. Device ids match `protos.mqtt.DEVICE_ID_RE`, so no `+ # /` can
reach an MQTT ACL. Keys are EC P-256, written 0600; the CA's key never leaves its folder.

The folder (`split-cloud ca init --dir STATE/pki`):

    ca.pem ca.key            the CA (key 0600; the folder 0711: files readable by name, not listable)
    server.pem server.key    the cloud's TLS server certificate (gRPC tier and broker), SANs from --host
    controller.pem/.key      the fleet controller's client certificate
    dashboard.pem/.key       the dashboard's certificate
    crl.pem                  the revocation list (regenerated on every revoke)
    issued.json              every certificate issued: serial, kind, name, expiry, revoked
    dashboard.token          the token the dashboard and /metrics ask for off loopback (0600)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.extras import require
from protos.mqtt import DEVICE_ID_RE

__all__ = ["KINDS", "SPIFFE", "CertificateAuthority", "Identity", "PkiError", "identity_of", "load_crl_serials",
           "serial_of", "write_private"]

SPIFFE = "spiffe://splitinfer"
KINDS = ("device", "controller", "dashboard")
CA_DAYS = 3650
SERVER_DAYS = 825
DEVICE_DAYS = 365
_FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "crl.pem", "issued.json")


class PkiError(Exception):
    """The CA folder is missing, incomplete or asked for something it cannot do; the message says what."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is: a device (name = device id), the controller or the dashboard."""

    kind: str
    name: str

    @property
    def uri(self) -> str:
        """The SAN URI that carries this identity."""
        return f"{SPIFFE}/{self.kind}/{self.name}" if self.kind == "device" else f"{SPIFFE}/{self.kind}"


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by the owner only (created 0600, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _x509() -> Any:
    return require("cryptography.x509", "cloud")


def identity_of(cert_pem: bytes) -> Identity | None:
    """The identity a PEM certificate carries in its SAN URI, or None when it carries none of ours."""
    x509 = _x509()
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        parts = uri.removeprefix(SPIFFE + "/").split("/") if uri.startswith(SPIFFE + "/") else []
        if len(parts) == 2 and parts[0] == "device" and DEVICE_ID_RE.fullmatch(parts[1]):
            return Identity("device", parts[1])
        if len(parts) == 1 and parts[0] in KINDS[1:]:
            return Identity(parts[0], parts[0])
    return None


def serial_of(cert_pem: bytes) -> int:
    """The serial number of a PEM certificate."""
    return int(_x509().load_pem_x509_certificate(cert_pem).serial_number)


def _check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise PkiError(f"device id {device_id!r} is invalid: expected 1-64 characters from [A-Za-z0-9_-]")
    if device_id in KINDS[1:]:  # Mosquitto knows identities by CN alone: a device "controller" would be one
        raise PkiError(f"device id {device_id!r} is reserved for the cloud's own certificate")
    return device_id


def _san_entries(hosts: Iterable[str]) -> list[Any]:
    x509 = _x509()
    out: list[Any] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


class CertificateAuthority:
    """The CA in `folder`: issues, revokes and lists certificates. Thread-safe; the files are the state."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        missing = [name for name in _FILES if not (self.dir / name).is_file()]
        if missing:
            raise PkiError(f"{self.dir} is not a splitinfer CA folder (missing {', '.join(missing)}): "
                           f"run `split-cloud ca init --dir {self.dir}` first")
        self._lock = threading.Lock()
        serialization = require("cryptography.hazmat.primitives.serialization", "cloud")
        self._cert = _x509().load_pem_x509_certificate(self.ca_cert.read_bytes())
        self._key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)

    # -- paths ---------------------------------------------------------------------------------------------------
    @property
    def ca_cert(self) -> Path:
        """The CA certificate (what every party trusts)."""
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA's private key (0600)."""
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The cloud's server certificate."""
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        """The cloud's server key (0600)."""
        return self.dir / "server.key"

    @property
    def crl(self) -> Path:
        """The revocation list, PEM."""
        return self.dir / "crl.pem"

    @property
    def token_file(self) -> Path:
        """The dashboard token (0600)."""
        return self.dir / "dashboard.token"

    def client_files(self, kind: str) -> tuple[Path, Path]:
        """(certificate, key) paths of the controller's or the dashboard's own certificate."""
        if kind not in KINDS[1:]:
            raise PkiError(f"no certificate kind {kind!r}: expected one of {list(KINDS[1:])}")
        return self.dir / f"{kind}.pem", self.dir / f"{kind}.key"

    # -- making the folder --------------------------------------------------------------------------------------
    @classmethod
    def init(cls, folder: str | Path, hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"), *,
             name: str = "splitinfer CA", days: int = CA_DAYS, force: bool = False) -> CertificateAuthority:
        """Make a new CA in `folder` with the server, controller and dashboard certificates and a token."""
        folder = Path(folder)
        if (folder / "ca.key").exists() and not force:
            raise PkiError(f"{folder} already holds a CA (ca.key): refusing to replace it (--force replaces it, "
                           "and every certificate it issued stops being trusted)")
        if not hosts:
            raise PkiError("the server certificate needs at least one host name or address (--host)")
        x509, ec, hashes, serialization = _crypto()
        folder.mkdir(parents=True, exist_ok=True)
        # 0711: no one else may list it, but a broker running as its own user (Mosquitto drops root) may read the
        # public files by name (ca.pem, server.pem, crl.pem); the keys and the token are 0600.
        os.chmod(folder, 0o711)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(folder / "ca.key", key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / "issued.json").write_text("[]\n")
        (folder / "crl.pem").write_bytes(b"")  # replaced below, once the CA can sign
        (folder / "server.pem").write_bytes(b"")
        (folder / "server.key").write_bytes(b"")
        ca = cls(folder)
        ca._write_crl()
        ca.issue_server(hosts)
        for kind in KINDS[1:]:
            cert_path, key_path = ca.client_files(kind)
            cert_pem, key_pem = ca._issue(Identity(kind, kind), days=SERVER_DAYS, server_hosts=None)
            cert_path.write_bytes(cert_pem)
            write_private(key_path, key_pem)
        write_private(ca.token_file, (secrets.token_urlsafe(32) + "\n").encode())
        return ca

    def issue_server(self, hosts: Sequence[str], days: int = SERVER_DAYS) -> None:
        """(Re)issue the cloud's server certificate for `hosts` (DNS names or IP addresses)."""
        cert_pem, key_pem = self._issue(None, days=days, server_hosts=list(hosts))
        self.server_cert.write_bytes(cert_pem)
        write_private(self.server_key, key_pem)

    # -- devices ------------------------------------------------------------------------------------------------
    def enroll(self, device_id: str, out: str | Path, *, days: int = DEVICE_DAYS, cloud: str | None = None,
               broker: str | None = None, server_name: str | None = None) -> Path:
        """Issue `device_id` a certificate and write its folder: ca.pem, device.pem, device.key, agent.toml."""
        _check_device_id(device_id)
        out = Path(out)
        cert_pem, key_pem = self._issue(Identity("device", device_id), days=days, server_hosts=None)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ca.pem").write_bytes(self.ca_cert.read_bytes())
        (out / "device.pem").write_bytes(cert_pem)
        write_private(out / "device.key", key_pem)
        lines = [
            f"# splitinfer agent for device {device_id!r}: made by `split-cloud enroll`. Fill in bundle.",
            f'device_id = "{device_id}"',
            'bundle = "/var/lib/splitinfer/bundle"',
            f'cloud = "{cloud or "CLOUD_HOST:50051"}"',
            "",
            "[tls]",
            'ca = "ca.pem"',
            'cert = "device.pem"',
            'key = "device.key"',
        ]
        if server_name:
            lines.append(f'server_name = "{server_name}"')
        if broker:
            lines += ["", "[mqtt]", f'broker = "{broker}"']
        (out / "agent.toml").write_text("\n".join(lines) + "\n")
        return out

    def revoke(self, device_id: str) -> list[int]:
        """Revoke every unrevoked certificate of `device_id`; returns their serials. PkiError if it has none."""
        _check_device_id(device_id)
        with self._lock:
            issued = self._issued()
            mine = [e for e in issued if e["kind"] == "device" and e["name"] == device_id]
            hit = [e for e in mine if not e.get("revoked")]
            if not hit:
                raise PkiError(f"device {device_id!r} is already revoked" if mine else
                               f"no certificate was issued to device {device_id!r} by this CA")
            stamp = _now().isoformat()
            for entry in hit:
                entry["revoked"] = stamp
            self._save_issued(issued)
            self._write_crl(issued)
        return [int(e["serial"]) for e in hit]

    def revoked_serials(self) -> frozenset[int]:
        """Serials on the revocation list (read from crl.pem, so another process's revoke is seen)."""
        return load_crl_serials(self.crl, self.ca_cert)

    def issued(self) -> list[dict[str, Any]]:
        """Every certificate this CA issued: serial, kind, name, not_after, revoked (ISO time or absent)."""
        with self._lock:
            return self._issued()

    # -- internals ----------------------------------------------------------------------------------------------
    def _issued(self) -> list[dict[str, Any]]:
        data = json.loads((self.dir / "issued.json").read_text() or "[]")
        if not isinstance(data, list):
            raise PkiError(f"{self.dir / 'issued.json'} is not a list: the CA folder is damaged")
        return data

    def _save_issued(self, issued: list[dict[str, Any]]) -> None:
        tmp = self.dir / "issued.json.tmp"
        tmp.write_text(json.dumps(issued, indent=1) + "\n")
        os.replace(tmp, self.dir / "issued.json")

    def _issue(self, who: Identity | None, *, days: int, server_hosts: list[str] | None) -> tuple[bytes, bytes]:
        x509, ec, hashes, serialization = _crypto()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        serial = x509.random_serial_number()
        common_name = who.name if who else "splitinfer-cloud"
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
        )
        if who is None:  # the cloud's server certificate
            builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(server_hosts or [])),
                                            critical=False)
            usages = [x509.ExtendedKeyUsageOID.SERVER_AUTH]
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(who.uri)]), critical=False)
            usages = [x509.ExtendedKeyUsageOID.CLIENT_AUTH]
            if who.kind == "dashboard":
                usages.append(x509.ExtendedKeyUsageOID.SERVER_AUTH)
        cert = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(self._key, hashes.SHA256())
        with self._lock:
            issued = self._issued()
            issued.append({"serial": str(serial), "kind": who.kind if who else "server",
                           "name": common_name, "not_after": (now + dt.timedelta(days=days)).isoformat()})
            self._save_issued(issued)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def _write_crl(self, issued: list[dict[str, Any]] | None = None) -> None:
        x509, _ec, hashes, serialization = _crypto()
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self._cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=CA_DAYS)))
        for entry in issued if issued is not None else self._issued():
            if entry.get("revoked"):
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(entry["serial"]))
                    .revocation_date(dt.datetime.fromisoformat(entry["revoked"])).build())
        crl = builder.sign(self._key, hashes.SHA256())
        tmp = self.dir / "crl.pem.tmp"
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, self.crl)


def load_crl_serials(path: Path, ca_cert: Path | None = None) -> frozenset[int]:
    """The revoked serials of a PEM CRL file (empty set for an empty file); with `ca_cert`, its signature checked."""
    data = Path(path).read_bytes()
    if not data.strip():
        return frozenset()
    x509 = _x509()
    crl = x509.load_pem_x509_crl(data)
    if ca_cert is not None:
        issuer = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        if not crl.is_signature_valid(issuer.public_key()):
            raise PkiError(f"{path}: the revocation list is not signed by {ca_cert}")
    return frozenset(int(r.serial_number) for r in crl)


def _crypto() -> tuple[Any, Any, Any, Any]:
    x509 = _x509()
    ec = require("cryptography.hazmat.primitives.asymmetric.ec", "cloud")
    hashes = require("cryptography.hazmat.primitives.hashes", "cloud")
    serialization = require("cryptography.hazmat.primitives.serialization", "cloud")
    return x509, ec, hashes, serialization


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
