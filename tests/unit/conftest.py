"""Unit tests open no sockets, start no servers and no subprocesses (STYLE.md; Ray Serve's unit conftest).

An autouse fixture replaces the calls that would do it with one that fails the test and says where such a test
belongs: `tests/integration/`. Unix socketpairs (asyncio's self-pipe) stay allowed: they reach no network.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest


class NetworkUseError(RuntimeError):
    """A unit test tried to open a socket, start a server or run a subprocess."""


def _refuse(what: str):
    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkUseError(f"unit tests may not {what}; move this test to tests/integration")

    return refuse


@pytest.fixture(autouse=True)
def _no_network_in_unit_tests(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any unit test that connects, binds or listens on a socket, starts a gRPC server or a subprocess."""
    for method in ("connect", "connect_ex", "bind", "listen", "sendto"):
        monkeypatch.setattr(socket.socket, method, _refuse(f"use socket.{method}"))
    monkeypatch.setattr(grpc, "server", _refuse("start a gRPC server"))
    monkeypatch.setattr(grpc.aio, "server", _refuse("start a gRPC server"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a subprocess"))
    yield
