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


# The stand-in's plan table: edge-only below 8 Mbps, the middle cut c1 up to 500, then cloud-only.
STAND_IN_TABLE = [{"uplink_mbps": 0.5, "cut": "edge-only"}, {"uplink_mbps": 8.0, "cut": "c1"},
                  {"uplink_mbps": 500.0, "cut": "cloud-only"}]


def _seed_bundles(bundles: Path) -> None:
    """The demo's two bundles, as stand-ins: the tiny bundle, whose plan table changes cut at 8 Mbps.

    The demo would profile mobilenet_v2 and vit_tiny (minutes on a CI runner); the tiny bundle has the same
    layout, and its table changes cut where the agent's bandwidth estimate sees the swing (2 Mbps and 4x8 Mbps)
    on any host. The demo reuses an intact bundle it finds under its name; everything after that (the uplinks
    it picks from the plan tables, the emulated devices, the agents' estimates and cut switches) is real.
    """
    for name in ("mobilenet_v2-rpi4", "vit_tiny-rpi4"):
        root = make_tiny_bundle(bundles / name)
        plan = json.loads((root / PLAN_FILE).read_text())
        plan["plan_table"] = STAND_IN_TABLE
        (root / PLAN_FILE).write_text(json.dumps(plan))


def test_demo_runs_agents_that_report_to_the_dashboard_and_stops_cleanly(tmp_path):
    _seed_bundles(tmp_path / "bundles")
    devices = {"pi-kitchen", "pi-yard", "pi-garage"}
    # A fixed CPU share instead of calibrating (which the unit and emulation tests cover), and the calibration cache
    # in the test's own state dir.
    env = {**child_env(), "SPLITINFER_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_tier.lab.demo", "--workdir", str(tmp_path), "--duration", "30", "--period", "8",
         "--devices", ",".join(sorted(devices)), "--cpu-share", "0.3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 60
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
        kitchen_cuts: set[str] = set()

        def poll() -> dict:
            nonlocal seen
            with urllib.request.urlopen(url + "api/fleet", timeout=5) as resp:
                seen = {row["device"]: row for row in json.load(resp)["devices"]}
            for row in seen.values():
                if row["cut"] and row["cut"] != "edge-only" and row["mode"] == "split" \
                        and row["edge_share"] is not None and row["edge_share"] < 1.0:
                    remote_served.add(row["device"])
                    if row["device"] == "pi-kitchen":
                        kitchen_cuts.add(row["cut"])
            if "pi-garage" in seen and seen["pi-garage"]["cut"]:
                garage_cuts.add(seen["pi-garage"]["cut"])
            return seen

        def all_reporting() -> bool:
            poll()
            return devices <= set(seen) and all(r["count"] > 0 for r in seen.values())

        polling.wait_for(all_reporting, "the three devices' telemetry on /api/fleet", 30, interval_s=0.5)
        assert devices <= set(seen), seen
        assert all(row["status"] == "online" and row["count"] > 0 for row in seen.values()), seen
        # The swinging uplink (4x8 <-> 2 Mbps every 4 s) moves the garage between edge-only and c1; the kitchen's
        # uplink is where its plan table chooses the middle cut, and the cloud serves it from there; so at least one
        # device is served from a cut other than edge-only.
        polling.wait_for(lambda: poll() and len(garage_cuts) >= 2 and "pi-kitchen" in remote_served,
                         f"a cut switch of pi-garage (cuts seen {garage_cuts}) and the kitchen served from a split "
                         f"(seen {remote_served}, kitchen cuts {kitchen_cuts})", 25, interval_s=0.5)
        assert "c1" in kitchen_cuts, kitchen_cuts  # the middle cut: a real split
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
    assert re.search(r"pi-kitchen: uplink 49 Mbps, where its plan table chooses the middle cut c1", out), out
    for device in sorted(devices):
        assert re.search(rf"agent {device} \(exit (0|130)\)", out), out
    assert "stopped:" in out and "Traceback" not in out
