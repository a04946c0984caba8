"""Lab tool: a real Mosquitto broker as a subprocess on 127.0.0.1 with a port the OS chose (tests, benchmarks).

With `pki` (a CA folder, cloud_tier.pki) it runs the production configuration `split-cloud mosquitto-config`
writes (TLS, client certificates, identity usernames, the ACL, the CRL); without, a plaintext broker that
accepts anyone (loopback only: the lab's insecure mode).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from cloud_tier.broker import write_mosquitto_config

MOSQUITTO = "/usr/sbin/mosquitto"


def mosquitto_path() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    if Path(MOSQUITTO).exists():
        return MOSQUITTO
    return shutil.which("mosquitto")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    # Bind port 0 then release it: mosquitto cannot report a port it chose itself.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A mosquitto subprocess with a generated config; start() returns the port, stop() ends it."""

    def __init__(self, workdir: Path, *, pki: Path | None = None, start_timeout_s: float = 10.0) -> None:
        """Config and log files go in `workdir`; with `pki` (a CA folder) the broker is TLS-only with the ACL."""
        self.workdir = Path(workdir)
        self.pki = None if pki is None else Path(pki)
        self.port: int | None = None
        self._timeout = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"

    @property
    def log_path(self) -> Path:
        """Mosquitto's own log file (read it when a test fails)."""
        return self.workdir / "mosquitto.log"

    def start(self) -> int:
        """Start mosquitto and wait (with a deadline) until it accepts TCP connections."""
        binary = mosquitto_path()
        if binary is None:
            raise FileNotFoundError(f"mosquitto not found at {MOSQUITTO} or on PATH (apt-get install mosquitto)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # the released port can be taken by someone else before mosquitto binds it
            self.port = free_port()
            conf = self.workdir / "mosquitto.conf"
            common = (
                "persistence false\n"
                # Bursts from a whole simulated fleet: a subscriber's queue beyond this is dropped by the broker.
                "max_queued_messages 100000\n"
                "max_inflight_messages 1000\n"
                f"log_dest file {self.log_path}\n"
                "log_type error\nlog_type warning\nlog_type notice\n"
            )
            if self.pki is not None:
                # As root, mosquitto would drop to the `mosquitto` user, who cannot read the 0600 server key.
                user = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
                write_mosquitto_config(self.workdir, self.pki, port=self.port, host=self.host, extra=common + user)
            else:
                conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                                + common)
            self._proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_ready():
                return self.port
            self.stop()
        raise RuntimeError(f"mosquitto did not start listening on 127.0.0.1 within {self._timeout} s; "
                           f"log: {self._log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self._timeout
        assert self._proc is not None and self.port is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.02)  # poll interval, not a wait for a fixed duration
        return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-2000:]
        except OSError:
            return "(no log)"

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its config, the ACL file and the CRL (connected clients stay connected)."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("mosquitto is not running")
        self._proc.send_signal(signal.SIGHUP)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate mosquitto (kill it if it does not exit within `timeout_s`)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
