"""systemd integration shared by the device agent and the cloud node (here in `models`, the bottom layer, so that
both can use it): the notify protocol, the watchdog period, and hardened unit files.

No dependency: sd_notify(3) is one datagram to the socket named by $NOTIFY_SOCKET. Outside systemd every call
is a no-op that says so (returns False / None).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServiceUnit", "SystemUserError", "ensure_system_user", "notify", "quote_exec", "user_ids", "verify_unit",
           "watchdog_period_s"]

log = logging.getLogger(__name__)

NOTIFY_DEADLINE_S = 1.0  # a notify that cannot be sent in this long is dropped (systemd is gone or wedged)
VERIFY_DEADLINE_S = 60.0
USERADD_DEADLINE_S = 30.0


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=...") to systemd; False when not
    running under a unit with NotifyAccess, or when the datagram could not be sent (logged once per call)."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target or not states:
        return False
    if target.startswith("@"):
        target = "\0" + target[1:]  # an abstract-namespace socket
    elif not target.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; not notifying systemd", target)
        return False
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(NOTIFY_DEADLINE_S)
            sock.connect(target)
            sock.sendall(payload)
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", ", ".join(states), exc)
        return False
    return True


def watchdog_period_s() -> float | None:
    """How often to send WATCHDOG=1: half of $WATCHDOG_USEC (sd_watchdog_enabled(3)); None when the unit has no
    watchdog or the variable is meant for another process ($WATCHDOG_PID)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog pings disabled", usec)
        return None
    return value / 2e6 if value > 0 else None


def quote_exec(argv: Sequence[str]) -> str:
    """One ExecStart= line from an argument vector, quoted by systemd's rules (systemd.service(5), "Command
    lines"): double quotes around words with spaces or quotes, backslash escapes, `%` and `$` doubled."""
    words = []
    for arg in argv:
        text = arg.replace("%", "%%").replace("$", "$$")
        if text == "" or any(c in text for c in " \t\"'\\;"):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        words.append(text)
    return " ".join(words)


@dataclass(frozen=True)
class ServiceUnit:
    """A hardened `Type=notify` service: a dedicated user, a read-only system, state/log/runtime directories
    under /var/lib, /var/log and /run (named by `name`), restart on failure, a watchdog."""

    name: str  # the unit's name without ".service", also its directories' names
    description: str
    exec_start: tuple[str, ...]
    user: str
    group: str | None = None  # default: the user's name
    watchdog_s: int = 30  # WatchdogSec; 0 disables
    stop_timeout_s: int = 30  # TimeoutStopSec: SIGTERM drains; SIGKILL after this
    restart_s: int = 2
    config_dir: str | None = None  # a folder under /etc the service reads (ConfigurationDirectory)
    read_only_paths: tuple[str, ...] = ()  # extra files or folders it reads (credentials outside config_dir)
    environment: tuple[tuple[str, str], ...] = ()
    private_devices: bool = True  # False on a Jetson whose runtime needs /dev/nvhost-* (the GPU)
    address_families: tuple[str, ...] = ("AF_UNIX", "AF_INET", "AF_INET6")
    documentation: str = "https://github.com/splitinfer/splitinfer#readme"
    extra_service: tuple[str, ...] = field(default=())

    def render(self) -> str:
        """The unit file's text."""
        group = self.group or self.user
        unit = [
            "[Unit]",
            f"Description={self.description}",
            f"Documentation={self.documentation}",
            "Wants=network-online.target",
            "After=network-online.target",
            "StartLimitIntervalSec=300",
            "StartLimitBurst=10",
            "",
            "[Service]",
            "Type=notify",
            "NotifyAccess=main",
            f"ExecStart={quote_exec(self.exec_start)}",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            f"RestartSec={self.restart_s}",
            f"TimeoutStopSec={self.stop_timeout_s}",
            "KillMode=mixed",
        ]
        if self.watchdog_s > 0:
            unit.append(f"WatchdogSec={self.watchdog_s}")
        unit += [
            f"User={self.user}",
            f"Group={group}",
            f"StateDirectory={self.name}",
            "StateDirectoryMode=0750",
            f"LogsDirectory={self.name}",
            "LogsDirectoryMode=0750",
            f"RuntimeDirectory={self.name}",
            "RuntimeDirectoryMode=0750",
        ]
        if self.config_dir:
            unit.append(f"ConfigurationDirectory={self.config_dir}")
        for key, value in self.environment:
            unit.append(f"Environment={quote_exec([f'{key}={value}'])}")
        unit += [
            "UMask=0027",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            f"PrivateDevices={'yes' if self.private_devices else 'no'}",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "ProtectClock=yes",
            "ProtectHostname=yes",
            "RestrictNamespaces=yes",
            "RestrictRealtime=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            f"RestrictAddressFamilies={' '.join(self.address_families)}",
            "SystemCallArchitectures=native",
            "CapabilityBoundingSet=",
            "AmbientCapabilities=",
        ]
        if self.read_only_paths:
            unit.append("ReadOnlyPaths=" + " ".join(quote_exec([p]) for p in self.read_only_paths))
        unit += list(self.extra_service)
        unit += ["", "[Install]", "WantedBy=multi-user.target", ""]
        return "\n".join(unit)


def verify_unit(text: str, name: str) -> str | None:
    """Run `systemd-analyze verify` on a unit's text; None when the tool is missing, else its complaints ("" when
    it has none). Complaints about the machine rather than the unit (a user that does not exist yet, a binary
    not installed here) are the caller's to judge."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory(prefix="splitinfer-unit-") as tmp:
        path = Path(tmp) / f"{name}.service"
        path.write_text(text)
        try:
            done = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True,
                                  timeout=VERIFY_DEADLINE_S, check=False)
        except subprocess.TimeoutExpired:
            return f"systemd-analyze verify did not finish in {VERIFY_DEADLINE_S:.0f} s"
    return (done.stdout + done.stderr).strip()


class SystemUserError(RuntimeError):
    """The service's system user could not be created (the message names the command and its error)."""


def user_ids(user: str) -> tuple[int, int] | None:
    """(uid, gid) of `user`, or None when there is no such user."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def ensure_system_user(user: str, home: str | Path) -> bool:
    """Create the system user `user` (with its group, no login, `home` not created) when missing; whether it was
    created. SystemUserError when useradd fails."""
    if user_ids(user) is not None:
        return False
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(home),
           "--shell", "/usr/sbin/nologin", user]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=USERADD_DEADLINE_S)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise SystemUserError(f"could not create the system user {user!r} ({' '.join(cmd)}): {detail}") from None
    return True
