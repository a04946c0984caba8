"""mTLS on the gRPC tier: server credentials reloaded on request (SIGHUP), the revocation list watched, and the
peer's identity read from its certificate.

`ServerTls(pki_dir)` reads ca.pem, server.pem/.key and crl.pem of a CA folder (cloud_tier/pki.py). Its
credentials are `grpc.dynamic_ssl_server_credentials` with `require_client_authentication=True`; gRPC asks the
fetcher on each new handshake, and the fetcher re-reads the files only after `reload()` (what SIGHUP calls), so a
re-issued server certificate or a new CA bundle is served to new connections without a restart. The CRL is
watched by `Revocations`: its mtime is checked at most once a second, and the serials re-read when it changed, so
`split-cloud revoke` takes effect at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cloud_tier.pki import identity_of, load_crl_serials, serial_of
from protos import inference_pb2 as pb
from protos import serde
from protos.serde import CloudReply

__all__ = ["Peer", "PeerGuard", "Revocations", "ServerTls", "peer_of"]

log = logging.getLogger(__name__)

CRL_CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a stream, from its certificate: kind ("device", "controller", "dashboard" or
    None for a certificate carrying none of our identities), name (the device id) and the certificate serial."""

    kind: str | None
    name: str
    serial: int


def peer_of(context: Any) -> Peer | None:
    """The peer of a grpc(.aio) call from its TLS auth context; None when it presented no certificate."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    pem = pems[0]
    identity = identity_of(pem)
    serial = serial_of(pem)
    if identity is None:
        names = auth.get("x509_common_name") or [b""]
        return Peer(None, names[0].decode(errors="replace"), serial)
    return Peer(identity.kind, identity.name, serial)


class Revocations:
    """The revoked serials of a CRL file, re-read when the file changes (checked at most every `interval_s`)."""

    def __init__(self, crl: Path, ca_cert: Path, interval_s: float = CRL_CHECK_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.crl = Path(crl)
        self.ca_cert = Path(ca_cert)
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = -float("inf")
        self._serials: frozenset[int] = frozenset()
        self.reloads = 0
        self._refresh(force=True)

    def serials(self) -> frozenset[int]:
        """The revoked serials now (a stat of the file at most once per interval)."""
        now = self._clock()
        if now - self._checked >= self.interval_s:
            self._refresh()
        return self._serials

    def is_revoked(self, serial: int) -> bool:
        """Whether `serial` is on the revocation list."""
        return serial in self.serials()

    def _refresh(self, force: bool = False) -> None:
        with self._lock:
            self._checked = self._clock()
            try:
                st = self.crl.stat()
            except OSError as exc:  # a missing CRL is an error at start, and keeps the last good list later
                if force:
                    raise
                log.error("revocation list %s unreadable (keeping the last good one): %s", self.crl, exc)
                return
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp and not force:
                return
            try:
                self._serials = load_crl_serials(self.crl, self.ca_cert)
            except Exception as exc:  # noqa: BLE001 - a half-written or bad CRL keeps the last good list
                if force:
                    raise
                log.error("revocation list %s not reloaded (keeping the last good one): %s", self.crl, exc)
                return
            self._stamp = stamp
            self.reloads += 1


class ServerTls:
    """Server credentials from a CA folder, re-read on `reload()`, and the folder's revocation list."""

    def __init__(self, pki_dir: str | Path):
        self.dir = Path(pki_dir)
        self.ca_cert, self.server_cert, self.server_key = (self.dir / n for n in ("ca.pem", "server.pem", "server.key"))
        missing = [p.name for p in (self.ca_cert, self.server_cert, self.server_key, self.dir / "crl.pem")
                   if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.dir} holds no CA for the gRPC tier (missing {', '.join(missing)}): run "
                                    f"`split-cloud ca init --dir {self.dir}` first, or serve --insecure on loopback")
        self._lock = threading.Lock()
        self._pending = False
        self.loads = 0
        self._initial = self._load()
        self.revocations = Revocations(self.dir / "crl.pem", self.ca_cert)

    def _load(self) -> Any:
        config = grpc.ssl_server_certificate_configuration(
            [(self.server_key.read_bytes(), self.server_cert.read_bytes())], root_certificates=self.ca_cert.read_bytes()
        )
        self.loads += 1
        return config

    def reload(self) -> None:
        """Have the next handshake re-read server.pem, server.key and ca.pem (safe from a signal handler)."""
        self._pending = True

    def _fetch(self) -> Any:
        """gRPC's certificate_configuration_fetcher: a new configuration after reload(), else None (no change)."""
        if not self._pending:
            return None
        with self._lock:
            if not self._pending:
                return None
            self._pending = False
            try:
                config = self._load()
            except Exception as exc:  # noqa: BLE001 - a half-written file keeps the old certificate in use
                log.error("TLS files in %s not reloaded (keeping the current ones): %s", self.dir, exc)
                return None
        log.info("TLS certificates reloaded from %s", self.dir)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        """mTLS credentials: clients must present a certificate signed by ca.pem."""
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch, require_client_authentication=True)


class PeerGuard:
    """What the servicer asks on an mTLS server: is this stream's peer a device in good standing, and does a
    request claim the device id its certificate names? Refusals are counted in `stats`."""

    def __init__(self, revocations: Revocations, stats: Any):
        self.revocations = revocations
        self.stats = stats

    async def admit(self, context: Any) -> Peer:
        """The stream's peer, a device whose certificate is not revoked; else the call ends PERMISSION_DENIED."""
        peer = peer_of(context)
        if peer is None or peer.kind != "device":
            who = "no client certificate" if peer is None else f"a {peer.kind or 'foreign'} certificate ({peer.name!r})"
            why = f"Infer is for devices; the peer presented {who}"
        elif self.revocations.is_revoked(peer.serial):
            why = f"the certificate of device {peer.name!r} (serial {peer.serial:x}) is revoked"
        else:
            return peer
        self.stats.incr("streams_refused")
        log.warning("Infer stream refused: %s (%s)", why, context.peer())
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def refuse(self, request: pb.InferRequest, peer: Peer) -> pb.InferResponse | None:
        """PERMISSION_DENIED for a request claiming another device's id (or from a since-revoked certificate);
        None to go on. A request without a device_id is the peer's: its id is filled in from the certificate."""
        if not request.device_id:
            request.device_id = peer.name
        if request.device_id == peer.name and not self.revocations.is_revoked(peer.serial):
            code = None
        elif request.device_id != peer.name:
            self.stats.incr("device_id_mismatches")
            code = f"device_id {request.device_id[:64]!r} is not this peer's: its certificate is device {peer.name!r}"
        else:
            self.stats.incr("revoked_requests")
            code = f"the certificate of device {peer.name!r} was revoked"
        if code is None:
            return None
        self.stats.error(grpc.StatusCode.PERMISSION_DENIED.name)
        return serde.reply_to_proto(CloudReply(request.request_id[:256], serde.status_number(
            grpc.StatusCode.PERMISSION_DENIED), code, received_unix_ns=time.time_ns()))
