"""models/systemd.py for real: sd_notify datagrams to a bound socket (path and abstract), the watchdog period from
the environment, and the agent's unit (`split-agent install`) checked by `systemd-analyze verify`, staged into a
root with the right modes and the config's paths rewritten to the installed files."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig
from edge_agent.install import SERVICE_NAME, agent_unit, split_agent_binary
from models import systemd
from models.tiny_bundle import make_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    folder = Path(tempfile.mkdtemp(prefix="sd-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    sock.settimeout(5.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(folder / "notify"))
    yield sock
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_notify_sends_one_datagram_with_every_state(notify_socket: socket.socket) -> None:
    assert systemd.notify("READY=1", "STATUS=mode split, cut c1")
    assert notify_socket.recv(4096).decode() == "READY=1\nSTATUS=mode split, cut c1"
    assert systemd.notify("WATCHDOG=1")
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"splitinfer-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_outside_systemd_or_to_a_gone_socket_is_a_false(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert systemd.notify("READY=1") is False


def test_watchdog_period_is_half_the_usec_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_period_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_period_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_period_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_period_s() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert systemd.watchdog_period_s() is None


def test_the_agent_unit_is_hardened_and_passes_systemd_analyze_verify() -> None:
    unit = agent_unit(Path("/etc/splitinfer/agent.toml"), "splitinfer", binary=split_agent_binary())
    text = unit.render()
    for line in ("Type=notify", "Restart=on-failure", "WatchdogSec=30", "User=splitinfer", "ProtectSystem=strict",
                 "StateDirectory=splitinfer-agent", "LogsDirectory=splitinfer-agent",
                 "RuntimeDirectory=splitinfer-agent", "After=network-online.target", "NoNewPrivileges=yes"):
        assert line in text.splitlines(), line
    assert f"ExecStart={split_agent_binary()} serve --config /etc/splitinfer/agent.toml" in text
    complaints = systemd.verify_unit(text, SERVICE_NAME)
    if complaints is None:
        pytest.skip("systemd-analyze is not installed")
    assert complaints == "", complaints


def test_a_broken_unit_is_reported_by_verify() -> None:
    text = agent_unit(Path("/etc/splitinfer/agent.toml"), "splitinfer", binary="/nonexistent/split-agent").render()
    complaints = systemd.verify_unit(text.replace("Type=notify", "Type=sometimes"), SERVICE_NAME)
    if complaints is None:
        pytest.skip("systemd-analyze is not installed")
    assert complaints, "systemd-analyze accepted a bad Type= and a missing binary"


def test_install_into_a_staging_root_places_files_with_modes_and_rewrites_paths(tmp_path: Path, device_tls) -> None:
    bundle = make_tiny_bundle(tmp_path / "src" / "tiny")
    tls = device_tls("inst-0")
    cfg = tmp_path / "src" / "agent.toml"
    cfg.write_text(f'bundle = "tiny"\ncloud = "cloud.example:50051"\ndevice_id = "inst-0"\n'
                   f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
                   f'[service]\nmax_requests = 8\n')
    root = tmp_path / "root"
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "install", "--config", str(cfg), "--root",
                           str(root)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # A staged root is an image: the steps left for the target, not the host's systemctl.
    assert "useradd --system" in done.stdout and "systemctl enable splitinfer-agent" in done.stdout
    assert "enable --now" not in done.stdout
    etc = root / "etc" / "splitinfer"
    modes = {p: stat.S_IMODE((etc / p).stat().st_mode) for p in ("", "agent.toml", "tls", "tls/ca.pem",
                                                                 "tls/device.pem", "tls/device.key")}
    assert modes == {"": 0o750, "agent.toml": 0o640, "tls": 0o750, "tls/ca.pem": 0o644, "tls/device.pem": 0o644,
                     "tls/device.key": 0o600}
    assert (etc / "tls" / "device.key").read_bytes() == tls.key.read_bytes()
    assert (etc / "bundle" / "plan.json").read_bytes() == (bundle / "plan.json").read_bytes()
    unit = root / "etc" / "systemd" / "system" / "splitinfer-agent.service"
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert "--config /etc/splitinfer/agent.toml" in unit.read_text()
    installed = AgentConfig.from_toml(etc / "agent.toml")  # the paths name the installed files (outside the root)
    assert installed.bundle == Path("/etc/splitinfer/bundle")
    assert installed.tls is not None and installed.tls.key == Path("/etc/splitinfer/tls/device.key")
    assert installed.service.max_requests == 8 and installed.cloud == "cloud.example:50051"
    printed = subprocess.run([sys.executable, "-m", "edge_agent.cli", "install", "--config", str(cfg), "--print"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and printed.stdout == unit.read_text(), printed.stderr
