"""A real EdgeAgent on the fleet control plane: telemetry into SQLite and /api/fleet, commands sent while it
was offline, adaptive cut switching behind an emulated link, and the last will of a killed `split-agent`.

Real Mosquitto, in-process CloudServer, FleetStore + FleetController (+ Dashboard); waits poll with deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_tier.dashboard import Dashboard
from cloud_tier.fleet_store import FleetStore
from cloud_tier.lab.linkproxy import LinkProxy
from cloud_tier.lab.mosquitto import Mosquitto
from cloud_tier.server import CloudServer
from edge_agent import CLOUD, EDGE, LOCAL, SPLIT, EdgeAgent
from edge_agent.control import AUTO_CUT, ControlLink
from models.manifest import CLOUD_ONLY, EDGE_ONLY, PLAN_FILE, Bundle
from models.tiny_bundle import MID_CUT, copy_bundle, make_tiny_bundle, sample_input
from protos.mqtt import Command
from tests import polling
from tests.pki import device_tls, tls_flags

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 10.0


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
    """Poll `cond` until truthy; fail naming `what` at the deadline."""
    return polling.wait_for(cond, what, timeout_s)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`served`: what the cloud serves (tiny); `adaptive`: a copy whose plan table is edge-only < 0.5 <= c1."""
    root = tmp_path_factory.mktemp("fleet_agent")
    served = make_tiny_bundle(root / "served" / "tiny")
    adaptive = copy_bundle(served, root / "adaptive")
    plan = json.loads((adaptive / PLAN_FILE).read_text())
    # plan.json is not hashed: rewriting the table keeps the bundle valid.
    plan["plan_table"] = [{"uplink_mbps": 0.0, "cut": EDGE_ONLY}, {"uplink_mbps": 0.5, "cut": MID_CUT}]
    (adaptive / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    assert Bundle.load(adaptive).best_cut_for(0.1) == EDGE_ONLY
    return {"served": served, "served_dir": root / "served", "adaptive": adaptive}


@pytest.fixture(scope="module")
def server(bundles: dict[str, Path]) -> Iterator[CloudServer]:
    srv = CloudServer(bundles["served_dir"], "127.0.0.1", 0, max_wait_ms=2.0)
    srv.start()
    yield srv
    srv.stop(grace=1.0)


def make_agent(
    bundle: Path, cloud: str, device_id: str, broker: Mosquitto, **fields: Any
) -> tuple[EdgeAgent, ControlLink]:
    """An agent plus its MQTT link (started, subscribed to its commands)."""
    fields.setdefault("connect_timeout_s", 1.0)
    fields.setdefault("backoff", {"initial_s": 0.05, "max_s": 0.3})
    fields.setdefault("probe_count", 1)
    mqtt = fields.pop("mqtt", {})
    fields.setdefault("tls", device_tls(device_id))  # mTLS with the session CA (tests/pki.py)
    agent = EdgeAgent.from_bundle(bundle, cloud, device_id=device_id,
                                  mqtt={"broker": f"{broker.host}:{broker.port}", "flush_interval_ms": 50,
                                        "insecure": broker.pki is None, **mqtt},
                                  **fields)
    try:
        link = ControlLink(agent, agent.config.mqtt).start(wait_s=DEADLINE_S)
    except BaseException:
        agent.close()
        raise
    return agent, link


def served_by_in_sqlite(store: FleetStore, device_id: str) -> tuple[Counter, set[str]]:
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, timeout=5.0) as conn:
        rows = conn.execute("SELECT served_by, request_id FROM requests WHERE device_id = ?", (device_id,)).fetchall()
    return Counter(r[0] for r in rows), {r[1] for r in rows}


def test_telemetry_of_a_real_agent_matches_sqlite_and_api_fleet(bundles, server, fleet, mosquitto):  # noqa: F811
    store, _ctl = fleet
    dash = Dashboard(store)
    dash.start()
    agent, link = make_agent(bundles["served"], server.address, "fleet-a", mosquitto, mqtt={"label": "bench cam"})
    try:
        assert agent.wait_for_mode(SPLIT, DEADLINE_S)
        results = [agent.infer(sample_input(seed=i), timeout=DEADLINE_S) for i in range(12)]
        agent.set_mode(LOCAL)
        results += [agent.infer(sample_input(seed=i), timeout=DEADLINE_S) for i in range(8)]
        sent = Counter(r.served_by for r in results)
        assert sent == {CLOUD: 12, EDGE: 8}
        wait_for(lambda: store.record_count("fleet-a") >= 20, "20 records of fleet-a in SQLite")
        by, ids = served_by_in_sqlite(store, "fleet-a")
        assert by == sent and ids == {r.request_id for r in results}
        dev = wait_for(lambda: (d := store.device("fleet-a")) and d["mode"] == LOCAL and d, "state mode local")
        assert dev["status"] == "online" and dev["cut"] == MID_CUT and dev["model"] == "tiny"
        assert dev["label"] == "bench cam" and dev["bandwidth_mbps"] > 0
        with urllib.request.urlopen(f"{dash.url}/api/fleet", timeout=DEADLINE_S) as resp:
            rows = {d["device"]: d for d in json.load(resp)["devices"]}
        row = rows["fleet-a"]
        assert row["count"] == 20 and row["edge_share"] == pytest.approx(8 / 20)
        assert row["status"] == "online" and row["mode"] == LOCAL and row["label"] == "bench cam"
        assert link.control.dropped_total == 0
    finally:
        agent.close()
        link.close()
        dash.stop()
    wait_for(lambda: store.device("fleet-a")["status"] == "offline", "fleet-a offline after close()")


def test_command_sent_while_offline_is_applied_once_on_reconnect(bundles, server, fleet, mosquitto):  # noqa: F811
    store, ctl = fleet
    first, link = make_agent(bundles["served"], server.address, "fleet-b", mosquitto)
    bad = ctl.send_command("fleet-b", Command.switch_cut("c42"))
    ack = ctl.wait_ack(bad, DEADLINE_S)
    assert ack is not None and not ack.ok and "c1" in ack.message and "edge-only" in ack.message
    first.close()
    link.close()
    wait_for(lambda: store.device("fleet-b")["status"] == "offline", "fleet-b offline")

    cid = ctl.send_command("fleet-b", Command.switch_cut(CLOUD_ONLY))
    assert ctl.wait_ack(cid, 0.3) is None  # nobody is there to apply it
    second, link2 = make_agent(bundles["served"], server.address, "fleet-b", mosquitto)
    try:
        ack = ctl.wait_ack(cid, DEADLINE_S)
        assert ack is not None and ack.ok, ack
        assert second.cut == CLOUD_ONLY
        ping = ctl.send_command("fleet-b", Command.ping())
        assert ctl.wait_ack(ping, DEADLINE_S).ok  # QoS 1 in order: anything redelivered came before this
        assert link2.applied == {"switch_cut": 1, "ping": 1}
        wait_for(lambda: store.device("fleet-b")["cut"] == CLOUD_ONLY, "fleet-b state cut cloud-only")
        assert store.command(cid)["ok"] is True
        r = second.infer(sample_input(), timeout=DEADLINE_S)
        assert r.cut == CLOUD_ONLY
        # Adaptive switching is off for this agent: "auto" is refused with the reason.
        auto = ctl.send_command("fleet-b", Command.switch_cut(AUTO_CUT))
        ack = ctl.wait_ack(auto, DEADLINE_S)
        assert ack is not None and not ack.ok and "adaptive" in ack.message
    finally:
        second.close()
        link2.close()


def test_rate_change_behind_a_link_proxy_switches_the_cut_without_flapping(
    bundles, server, fleet, mosquitto  # noqa: F811
):
    store, ctl = fleet
    proxy = LinkProxy("127.0.0.1", server.port, burst_bytes=0)
    proxy.start()
    agent, link = make_agent(
        bundles["adaptive"], proxy.address, "fleet-c", mosquitto, cut=MID_CUT, deadline_ms=3000,
        adaptive={"enabled": True, "min_dwell_s": 0.3, "min_samples": 3, "probe_interval_s": 0.2},
    )
    ad = agent.adaptive
    assert ad is not None
    try:
        assert agent.wait_for_mode(SPLIT, DEADLINE_S)
        for i in range(5):  # a fast link: c1 is right and stays
            assert agent.infer(sample_input(seed=i), timeout=DEADLINE_S).served_by == CLOUD
        assert agent.cut == MID_CUT and ad.switches == 0

        proxy.set_rates(0.1, None)  # 2 KB of int8 activation now takes ~160 ms: below 0.5 / 1.25 Mbit/s

        def slow_request_then_edge_only() -> bool:
            agent.infer(sample_input(), timeout=DEADLINE_S)
            return agent.cut == EDGE_ONLY

        wait_for(slow_request_then_edge_only, "the switch to edge-only at 0.1 Mbit/s")
        assert agent.infer(sample_input(), timeout=DEADLINE_S).cut == EDGE_ONLY
        wait_for(lambda: store.device("fleet-c")["cut"] == EDGE_ONLY, "state cut edge-only")
        est = agent.bandwidth.estimate()
        assert est.mbps is not None and est.mbps < 0.4, est

        probes = ad.probes  # edge-only sends nothing: measurement probes keep the estimate fresh
        wait_for(lambda: ad.probes >= probes + 5, "5 measurement probes on edge-only")
        assert agent.cut == EDGE_ONLY and ad.switches == 1  # a constant rate: no flapping

        proxy.set_rates(None, None)
        wait_for(lambda: agent.cut == MID_CUT, "the switch back to c1 on a fast link")
        wait_for(lambda: ad.switches >= 2, "the switch counted (AdaptiveCut counts it after set_cut returns)")
        assert ad.switches == 2
        wait_for(lambda: store.device("fleet-c")["cut"] == MID_CUT, "state cut c1")
        assert agent.wait_for_mode(SPLIT, DEADLINE_S)
        assert agent.infer(sample_input(), timeout=DEADLINE_S).served_by == CLOUD

        # A cloud override pins the cut and suspends adaptivity; "auto" hands it back.
        cid = ctl.send_command("fleet-c", Command.switch_cut(EDGE_ONLY))
        assert ctl.wait_ack(cid, DEADLINE_S).ok
        assert agent.cut == EDGE_ONLY and ad.pinned
        probes = ad.probes
        cid = ctl.send_command("fleet-c", Command.switch_cut(AUTO_CUT))
        assert ctl.wait_ack(cid, DEADLINE_S).ok and not ad.pinned
        wait_for(lambda: agent.cut == MID_CUT, "adaptive back to c1 after 'auto'")
        assert ad.probes >= probes  # pinned: no probing, then measuring again
    finally:
        agent.close()
        link.close()
        proxy.stop()


def test_requests_in_flight_finish_on_the_cut_they_started_on(bundles, server, fleet, mosquitto):  # noqa: F811
    _store, ctl = fleet
    proxy = LinkProxy("127.0.0.1", server.port)
    proxy.start()
    agent, link = make_agent(bundles["served"], proxy.address, "fleet-e", mosquitto, cut=MID_CUT,
                             deadline_ms=5000)
    try:
        assert agent.wait_for_mode(SPLIT, DEADLINE_S)
        proxy.blackhole(True)  # what is sent now waits in the proxy: the requests stay in flight
        futures = [agent.submit(sample_input(seed=i)) for i in range(3)]
        wait_for(lambda: agent.stats().sent >= 3, "3 requests on the wire")
        cid = ctl.send_command("fleet-e", Command.switch_cut(CLOUD_ONLY))  # while they are in flight
        assert ctl.wait_ack(cid, DEADLINE_S).ok and agent.cut == CLOUD_ONLY
        proxy.blackhole(False)
        results = [f.result(DEADLINE_S) for f in futures]
        assert [(r.cut, r.served_by) for r in results] == [(MID_CUT, CLOUD)] * 3
        assert agent.infer(sample_input(), timeout=DEADLINE_S).cut == CLOUD_ONLY
    finally:
        agent.close()
        link.close()
        proxy.stop()


def test_killed_split_agent_shows_offline_by_last_will(bundles, server, fleet_tls, mosquitto_tls, pki,
                                                       tmp_path):  # noqa: F811
    """A `split-agent` process with its certificate ([mqtt] TLS files relative to its TOML), through Mosquitto
    with the generated TLS config and ACL: its telemetry arrives, and its last will (own state topic) too."""
    store, _ctl = fleet_tls
    folder = pki.enroll("fleet-d", tmp_path / "fleet-d")
    (folder / "mqtt.toml").write_text(
        f'bundle = "{bundles["served"]}"\n[mqtt]\nbroker = "{mosquitto_tls.host}:{mosquitto_tls.port}"\n'
        'tls_ca = "ca.pem"\ntls_cert = "device.pem"\ntls_key = "device.key"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(folder / "mqtt.toml"), "--cloud",
         server.address, "--device-id", "fleet-d",
         "--label", "doomed", "--count", "100000", "--rate", "50", "--quiet", *tls_flags("fleet-d")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=env,
    )
    try:
        wait_for(lambda: proc.poll() is not None or store.record_count("fleet-d") >= 5,
                 "telemetry from the split-agent process", timeout_s=20.0)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        dev = store.device("fleet-d")
        assert dev["status"] == "online" and dev["label"] == "doomed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(DEADLINE_S)
        dev = wait_for(lambda: (d := store.device("fleet-d"))["status"] == "offline" and d, "fleet-d offline (will)")
        assert dev["label"] == "doomed"  # the will is fixed at connect time: it carries the label, not the cut
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE_S)
        if proc.stderr is not None:
            proc.stderr.close()
