"""`split-demo` end to end: bundles, cloud stack, link proxies and agent processes, then a clean stop."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests import polling

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_agents_that_report_to_the_dashboard_and_stops_cleanly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_tier.lab.demo", "--workdir", str(tmp_path), "--duration", "25", "--period", "8",
         "--devices", "pi-porch,pi-yard"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
        seen: dict = {}

        def both_reporting() -> bool:
            nonlocal seen
            with urllib.request.urlopen(url + "api/fleet", timeout=5) as resp:
                seen = {row["device"]: row for row in json.load(resp)["devices"]}
            return {"pi-porch", "pi-yard"} <= set(seen) and all(r["count"] > 0 for r in seen.values())

        polling.wait_for(both_reporting, "both devices' telemetry on /api/fleet", 20, interval_s=0.5)
        assert {"pi-porch", "pi-yard"} <= set(seen), seen
        assert all(row["status"] == "online" and row["count"] > 0 for row in seen.values()), seen
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
    for device in ("pi-yard", "pi-porch"):
        assert re.search(rf"agent {device} \(exit (0|130)\)", out), out
    assert "stopped:" in out and "Traceback" not in out
