"""CloudProcess: `split-cloud serve` in a child process, for kill tests and benchmarks.

The child runs `python -m cloud_tier.cli` with this interpreter, so it works from an installed package; from a
source checkout (a pyproject.toml beside the package) the child runs in the checkout with it first on
PYTHONPATH, so it runs the same code as the parent.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from cloud_tier.config import parse_address

LISTENING = "listening on "
BROKER_LINE = re.compile(r"^mqtt broker (\S+):(\d+) \((embedded|external)\)$")
DASHBOARD_LINE = re.compile(r"^dashboard (http://\S+/)$")
_ROOT = Path(__file__).resolve().parents[2]  # the checkout, or site-packages when installed
CHECKOUT: Path | None = _ROOT if (_ROOT / "pyproject.toml").is_file() else None


def child_env() -> dict[str, str]:
    """This process's environment, with the source checkout first on PYTHONPATH when running from one."""
    if CHECKOUT is None:
        return dict(os.environ)  # installed: the child imports the same package from site-packages
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


class CloudProcess:
    """Start `python -m cloud_tier.cli serve` and read the addresses it prints; terminate() drains, kill() does not.

    With the fleet (no `--no-fleet` in `extra_args`), `start()` also waits for the broker and dashboard lines:
    `broker_host`, `broker_port`, `broker_embedded` and `dashboard_url` are then set.

    The gRPC tier serves mTLS, as in production: with the CA folder `pki` (default: the one `split-cloud serve`
    finds, STATE/pki); clients need a certificate of that CA. `insecure=True` passes `--insecure` (plaintext,
    device ids from requests) for the runs whose point is to compare with it.
    """

    def __init__(self, bundles_dir: str | Path, *extra_args: str, host: str = "127.0.0.1", start_timeout: float = 60.0,
                 pki: str | Path | None = None, insecure: bool = False):
        security = ["--insecure"] if insecure else ([] if pki is None else ["--pki", str(Path(pki).resolve())])
        # Port 0 for every listener the caller does not pin (`split-cloud serve` defaults to the stable ports).
        ports = [] if "--port" in extra_args else ["--port", "0"]
        if "--no-fleet" not in extra_args:
            if "--dashboard-port" not in extra_args:
                ports += ["--dashboard-port", "0"]
            if "--broker" not in extra_args and "--broker-port" not in extra_args:
                ports += ["--broker-port", "0"]
        self.args = [sys.executable, "-m", "cloud_tier.cli", "serve", "--bundles", str(Path(bundles_dir).resolve()),
                     "--host", host, *ports, *security, *extra_args]
        self.insecure = insecure
        self.host = host
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.fleet = "--no-fleet" not in extra_args
        self.broker_host: str | None = None
        self.broker_port: int | None = None
        self.broker_embedded: bool | None = None
        self.dashboard_url: str | None = None
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue(maxsize=10_000)  # stdout lines; None: it exited

    def start(self) -> int:
        """Spawn the server and wait (bounded) for its `listening on` (and fleet) lines; return the gRPC port."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=child_env(), cwd=CHECKOUT)  # -m puts the cwd first on sys.path
        threading.Thread(target=self._pump, daemon=True, name="cloud-process-stdout").start()
        seen: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=self.start_timeout)
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"split-cloud printed no '{LISTENING}' line in {self.start_timeout} s: "
                                   f"{seen}") from None
            if line is None:
                raise RuntimeError(f"split-cloud exited with {self.proc.wait()} before listening: {''.join(seen)}")
            seen.append(line)
            self._parse(line.rstrip("\n"))
            if self.port is not None and (not self.fleet or (self.broker_port and self.dashboard_url)):
                return self.port

    def _parse(self, line: str) -> None:
        if line.startswith(LISTENING):
            self.port = parse_address(line[len(LISTENING):], "split-cloud's listening line")[1]
        elif m := BROKER_LINE.match(line):
            self.broker_host, self.broker_port = m.group(1), int(m.group(2))
            self.broker_embedded = m.group(3) == "embedded"
        elif m := DASHBOARD_LINE.match(line):
            self.dashboard_url = m.group(1)

    @property
    def broker_address(self) -> str | None:
        """host:port of the MQTT broker the node uses (None with --no-fleet)."""
        return None if self.broker_port is None else f"{self.broker_host}:{self.broker_port}"

    @property
    def address(self) -> str:
        """host:port clients dial."""
        return f"{self.host}:{self.port}"

    def reload_certificates(self) -> None:
        """SIGHUP: the server serves the certificates now on disk to new connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain) and wait for the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the cloud vanishes without a goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put_nowait(line)
            except queue.Full:
                pass  # nobody is reading the log: drop rather than block the child on a full pipe
        self.lines.put(None)

    def __enter__(self) -> CloudProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
