"""The cloud node dies (SIGKILL) and comes back on the same ports, with the same fleet store and CA: a running
`split-agent` finds the gRPC tier and the embedded broker again by itself (backoff with jitter on both links),
returns to split mode, and its telemetry reaches the store again; nobody restarts the agent.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_tier.lab.mosquitto import free_port
from cloud_tier.lab.process import CHECKOUT, CloudProcess, child_env
from cloud_tier.pki import CertificateAuthority
from models.tiny_bundle import make_tiny_bundle
from tests.pki import device_tls
from tests.polling import wait_for

DEVICE = "restart-cam"
RECONNECT_BOUND_S = 45.0  # backoff at most 2 s (gRPC) and 2 s (MQTT), a cloud start (~5-10 s on a busy host)


def _query(db: Path, sql: str, *params: object) -> list[tuple]:
    """Read the fleet store as the dashboard would (its own read-only connection)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # the store's tables are not made yet
        return []
    finally:
        conn.close()


def _cloud_served_since(db: Path, since: float) -> int:
    rows = _query(db, "SELECT COUNT(*) FROM requests WHERE device_id = ? AND served_by = 'cloud' AND ts > ?",
                  DEVICE, since)
    return rows[0][0] if rows else 0


def _mode(db: Path) -> tuple[str, str] | None:
    rows = _query(db, "SELECT status, mode FROM devices WHERE device_id = ?", DEVICE)
    return rows[0] if rows else None


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    make_tiny_bundle(tmp_path / "bundles" / "tiny")
    return tmp_path / "bundles"


def test_an_agent_returns_to_split_mode_and_reports_after_the_cloud_is_killed_and_restarted(
        bundles: Path, pki: CertificateAuthority, tmp_path: Path) -> None:
    grpc_port, broker_port, dashboard_port = free_port(), free_port(), free_port()
    db = tmp_path / "fleet.db"
    serve = ("--port", str(grpc_port), "--broker-port", str(broker_port), "--dashboard-port", str(dashboard_port),
             "--db", str(db), "--cpu-only", "--log-level", "WARNING")
    tls = device_tls(DEVICE)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'bundle = "{bundles / "tiny"}"\ncloud = "127.0.0.1:{grpc_port}"\ndevice_id = "{DEVICE}"\n'
        "connect_timeout_s = 1.0\ndeadline_ms = 2000\nprobe_count = 1\n"
        f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
        "[backoff]\ninitial_s = 0.1\nmax_s = 2.0\n"
        "[input]\nrate = 20.0\ncount = 100000\n"
        f'[mqtt]\nbroker = "127.0.0.1:{broker_port}"\nflush_interval_ms = 200\nreconnect_min_s = 1\n'
        "reconnect_max_s = 2\n")
    cloud = CloudProcess(bundles, *serve, pki=pki.dir)
    cloud.start()
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config), "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=CHECKOUT,
                             env=child_env())
    try:
        wait_for(lambda: _cloud_served_since(db, 0.0) > 0, "the agent's cloud-served telemetry in the store",
                 timeout_s=60.0)
        assert _mode(db) == ("online", "split")

        cloud.kill()  # no drain, no goodbye: the broker and the gRPC tier vanish together
        killed_at = time.time()
        cloud = CloudProcess(bundles, *serve, pki=pki.dir)  # the same ports, fleet store and CA
        assert cloud.start() == grpc_port and cloud.broker_port == broker_port

        wait_for(lambda: _cloud_served_since(db, killed_at) > 0,
                 "requests served by the cloud again, reported after the restart", timeout_s=RECONNECT_BOUND_S)
        wait_for(lambda: _mode(db) == ("online", "split"), "the device online in split mode again", timeout_s=10.0)
        assert agent.poll() is None, "the agent had to be restarted"
        before = _cloud_served_since(db, killed_at)
        wait_for(lambda: _cloud_served_since(db, killed_at) > before, "telemetry still flowing", timeout_s=10.0)
    finally:
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGINT)  # the agent drains and prints its summary
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(timeout=10)
        agent.communicate(timeout=10)
        cloud.kill()
