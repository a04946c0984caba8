"""`split-demo` end to end: bundles, cloud stack, link proxies and agent processes, then a clean stop."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cloud_tier.lab.process import child_env
from models.manifest import PLAN_FILE
from models.tiny_bundle import make_tiny_bundle
from tests import polling

ROOT = Path(__file__).resolve().parents[2]


def _seed_swing_bundle(bundles: Path) -> None:
    """The garage device's bundle, as a stand-in: the tiny bundle whose plan table changes cut at 8 Mbps.

    The demo would profile mobilenet_v2 for it (about two minutes on a CI runner); the tiny bundle has the same
    layout, and its table changes cut where the agent's bandwidth estimate sees the swing (2 Mbps and 4x8 Mbps)
    on any host. The demo reuses an intact bundle it finds under its name.
    """
    root = make_tiny_bundle(bundles / "mobilenet_v2-rpi4")
    plan = json.loads((root / PLAN_FILE).read_text())
    plan["plan_table"] = [{"uplink_mbps": 0.5, "cut": "edge-only"}, {"uplink_mbps": 8.0, "cut": "c1"}]
    (root / PLAN_FILE).write_text(json.dumps(plan))


def test_demo_runs_agents_that_report_to_the_dashboard_and_stops_cleanly(tmp_path):
    _seed_swing_bundle(tmp_path / "bundles")
    # A fixed CPU share instead of calibrating (which the unit and emulation tests cover), and the calibration cache
    # in the test's own state dir.
    env = {**child_env(), "SPLITINFER_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_tier.lab.demo", "--workdir", str(tmp_path), "--duration", "30", "--period", "8",
         "--devices", "pi-porch,pi-yard,pi-garage", "--cpu-share", "0.3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 240  # the first run profiles the demo's bundle
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "split-demo exited early:\n" + "".join(lines)
            lines.append(line)
            match = re.match(r"dashboard: (http://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else None
        assert url, "".join(lines)
        # The first line says whether the devices run as emulated devices or, and why, at host speed.
        assert lines[0].startswith(("devices run as emulated devices", "devices run at host speed")), lines[0]
        seen: dict = {}
        garage_cuts: set[str] = set()
        remote_served: set[str] = set()

        def poll() -> dict:
            nonlocal seen
            with urllib.request.urlopen(url + "api/fleet", timeout=5) as resp:
                seen = {row["device"]: row for row in json.load(resp)["devices"]}
            for row in seen.values():
                if row["cut"] and row["cut"] != "edge-only" and row["mode"] == "split" \
                        and row["edge_share"] is not None and row["edge_share"] < 1.0:
                    remote_served.add(row["device"])
            if "pi-garage" in seen and seen["pi-garage"]["cut"]:
                garage_cuts.add(seen["pi-garage"]["cut"])
            return seen

        def all_reporting() -> bool:
            poll()
            return {"pi-porch", "pi-yard", "pi-garage"} <= set(seen) and all(r["count"] > 0 for r in seen.values())

        polling.wait_for(all_reporting, "the three devices' telemetry on /api/fleet", 30, interval_s=0.5)
        assert {"pi-porch", "pi-yard"} <= set(seen), seen
        assert all(row["status"] == "online" and row["count"] > 0 for row in seen.values()), seen
        # The swinging uplink (4x8 <-> 2 Mbps every 4 s) moves the garage between edge-only and c1, and at least one
        # device is served by the cloud from a cut other than edge-only.
        polling.wait_for(lambda: poll() and len(garage_cuts) >= 2 and remote_served,
                         f"a cut switch of pi-garage (cuts seen {garage_cuts}) and a device served from a split "
                         f"(seen {remote_served})", 25, interval_s=0.5)
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "cloud unreachable" in out and "cloud reachable again" in out
    # An agent still feeding when the duration ends is stopped with SIGINT: it finishes what it sent, prints its
    # summary and exits 130; one that sent its whole count first exits 0.
    for device in ("pi-yard", "pi-porch", "pi-garage"):
        assert re.search(rf"agent {device} \(exit (0|130)\)", out), out
    assert "stopped:" in out and "Traceback" not in out
