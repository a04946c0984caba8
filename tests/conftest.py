"""Shared fixtures: a temp state dir for the servers tests start, with the session's CA in it (its default place,
STATE/pki, so servers started without --pki serve mTLS with it); device certificates from that CA; zoo models
converted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory):
    """Servers started by the tests (in process or as subprocesses) keep their fleet DB in a temp dir."""
    import os

    old = os.environ.get("SPLITINFER_STATE_DIR")
    state = tmp_path_factory.mktemp("state")
    os.environ["SPLITINFER_STATE_DIR"] = str(state)
    try:
        from cloud_tier.pki import CertificateAuthority
    except ImportError:  # the [edge]-only test job: no cloud tier, no CA needed
        pass
    else:
        try:
            CertificateAuthority.init(state / "pki", ["localhost", "127.0.0.1", "::1"])
        except ImportError:  # cryptography is not installed
            pass
    yield
    if old is None:
        os.environ.pop("SPLITINFER_STATE_DIR", None)
    else:
        os.environ["SPLITINFER_STATE_DIR"] = old


@pytest.fixture(scope="session")
def zoo_onnx(tmp_path_factory):
    """zoo_onnx(name) -> path of that zoo model's normalized ONNX, converted once per session."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("zoo")

    def get(name: str) -> Path:
        if name not in cache:
            import torch

            from models.convert import to_onnx
            from models.zoo import build_zoo_model, zoo_entry

            entry = zoo_entry(name)
            cache[name] = to_onnx(build_zoo_model(name), (torch.randn(*entry.input_shape),), root / f"{name}.onnx")
        return cache[name]

    return get



@pytest.fixture(scope="session")
def pki(_state_dir):
    """The session's CertificateAuthority (STATE/pki: where `split-cloud serve` and CloudServer look by default)."""
    import os

    pytest.importorskip("cryptography")
    from cloud_tier.pki import CertificateAuthority

    return CertificateAuthority(Path(os.environ["SPLITINFER_STATE_DIR"]) / "pki")


@pytest.fixture(scope="session")
def device_tls(pki):
    """device_tls(device_id) -> the edge_agent TlsConfig of a certificate of the session CA for that device
    (enrolled once per session; its folder is `.cert.parent`). tests/pki.py has the same for plain functions."""
    from tests import pki as session_pki

    return session_pki.device_tls


@pytest.fixture(scope="session")
def device_channel(pki):
    """device_channel(address, device_id="test", options=()) -> a grpc.Channel to the cloud tier with mTLS, as that
    device (a certificate of the session CA)."""
    from tests import pki as session_pki

    return session_pki.device_channel
