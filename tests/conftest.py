"""Shared fixtures: zoo models converted once per session, and the unit-test socket guard."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory):
    """Servers started by the tests (in process or as subprocesses) keep their fleet DB in a temp dir."""
    import os

    old = os.environ.get("SPLITINFER_STATE_DIR")
    os.environ["SPLITINFER_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
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


@pytest.fixture(autouse=True)
def _no_sockets_in_unit_tests(request, monkeypatch):
    """Unit tests may not open sockets (STYLE.md); integration tests may."""
    if "tests/unit" not in str(Path(request.node.fspath).as_posix()):
        return

    def refuse(*args, **kwargs):
        raise RuntimeError("unit tests may not open sockets; move this test to tests/integration")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "bind", refuse)


def pytest_configure(config):
    """Markers: `needs_profile` tests need the [profile] extra (onnx/torch); the [edge]-only job deselects them."""
    config.addinivalue_line("markers", "needs_profile: needs the [profile] extra (onnx, torch), not just [edge]")
