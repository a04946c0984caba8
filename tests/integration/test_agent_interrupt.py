"""`split-agent run` stopped with Ctrl-C (SIGINT): the feed stops, what was submitted finishes, a summary prints."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from models.tiny_bundle import make_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]


def _split_agent(bundle: Path, tls: Any, device_id: str, *args: str) -> subprocess.Popen:
    """`split-agent run` as `device_id`; no cloud listens on port 1 of loopback, so it runs all on the device."""
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--bundle", str(bundle), "--cloud", "127.0.0.1:1",
         "--quiet", "--log-level", "ERROR", "--device-id", device_id,
         "--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_sigint_stops_the_feed_and_summarizes_what_was_sent(tmp_path, device_tls):
    bundle = make_tiny_bundle(tmp_path / "tiny")
    proc = _split_agent(bundle, device_tls("edge-0"), "edge-0", "--rate", "50", "--count", "1000000")
    try:
        first = proc.stderr.readline()  # "split-agent: tiny cut ... mode ...": the feed is starting
        assert first.startswith("split-agent:"), first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    match = re.search(r"interrupted after (\d+) of 1000000 requests", err)
    assert match, err
    assert f"requests {match.group(1)} " in out and "failed 0" in out, out
    assert "Traceback" not in err


def test_a_sigint_that_lands_after_the_summary_changes_nothing(tmp_path, device_tls):
    """split-demo stops its agents with SIGINT when its time is up; an agent that had just finished its count
    must still exit 0 (it used to find Python's default handler back and die by the signal: exit -2)."""
    bundle = make_tiny_bundle(tmp_path / "tiny")
    tls = device_tls("edge-1")
    for _ in range(3):
        proc = _split_agent(bundle, tls, "edge-1", "--count", "3")
        try:
            first = proc.stdout.readline()  # the summary's first line: the run is over, the process is exiting
            assert first.strip(), proc.stderr.read()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode in (0, 130), (proc.returncode, err)
        assert "Traceback" not in err
