"""Certificates of the session CA (STATE/pki, made by tests/conftest.py) for code that is not a fixture: a
helper function of a test module can call these directly."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any


@functools.cache
def device_folder(device_id: str) -> Path:
    """A folder with ca.pem, device.pem and device.key for `device_id`, issued by the session CA (once)."""
    from cloud_tier.config import default_pki_dir
    from cloud_tier.pki import CertificateAuthority

    out = Path(tempfile.mkdtemp(prefix=f"device-{device_id}-", dir=default_pki_dir().parent))
    return CertificateAuthority(default_pki_dir()).enroll(device_id, out)


def device_tls(device_id: str) -> Any:
    """The edge_agent TlsConfig of `device_id`'s certificate."""
    from edge_agent.config import TlsConfig

    return TlsConfig.from_folder(device_folder(device_id))


def tls_flags(device_id: str) -> list[str]:
    """`split-agent run` flags that connect as `device_id`."""
    tls = device_tls(device_id)
    return ["--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]


def device_channel(address: str, device_id: str = "test", options: Any = ()) -> Any:
    """A grpc.Channel to the cloud tier over mTLS as `device_id`."""
    import grpc

    tls = device_tls(device_id)
    creds = grpc.ssl_channel_credentials(tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes())
    return grpc.secure_channel(address, creds, options=list(options))
