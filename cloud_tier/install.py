"""`split-cloud install`: the cloud node as a hardened systemd service.

    sudo split-cloud install --bundles /srv/splitinfer/bundles --pki ~/.local/state/splitinfer/pki
    split-cloud install --bundles /srv/splitinfer/bundles --print          # only print the unit
    split-cloud install --bundles B --root /tmp/image                       # stage into a folder (images, tests)
    sudo split-cloud install --bundles B -- --host 0.0.0.0                  # arguments after -- go to `serve`

What it places (under --root DIR everything goes below DIR):
    /var/lib/splitinfer-cloud/                 0750 USER   the state directory (StateDirectory=): fleet.db lives here
    /var/lib/splitinfer-cloud/pki/             0700 USER   the deployment's CA folder, copied from --pki: keys and
                                                           the dashboard token 0600, certificates and the CRL 0640
    /etc/systemd/system/splitinfer-cloud.service  0644     the Type=notify unit (models/systemd.ServiceUnit)
The bundles stay where --bundles says (read-only to the service). The service runs `split-cloud serve` with the
stable ports (gRPC 50051, MQTT 8883, dashboard 8080, all on 127.0.0.1 unless serve arguments say otherwise),
tells systemd READY=1 once serving, WATCHDOG=1 while the gRPC tier runs and STOPPING=1 when it drains.
The service user is created (`useradd --system`) when missing, only when installing for real as root.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from models import systemd
from models.systemd import ServiceUnit

__all__ = ["DEFAULT_USER", "SERVICE_NAME", "CloudInstall", "InstallError", "cloud_unit", "install"]

SERVICE_NAME = "splitinfer-cloud"
DEFAULT_USER = "splitinfer-cloud"
STATE_DIR = Path("/var/lib") / SERVICE_NAME  # systemd's StateDirectory=SERVICE_NAME
UNIT_DIR = Path("/etc/systemd/system")
PRIVATE_FILES = (".key", ".token")  # files of the CA folder only the service may read
# What the node never needs: the CA's signing key (a compromised node could mint device certificates) and the
# device folders `split-cloud enroll` writes by default (each holds a device's private key).
NOT_SERVED = ("ca.key", "devices")


class InstallError(RuntimeError):
    """Installation cannot go on (no CA, not root, a bad path); the message says which and what to do."""


def split_cloud_command() -> list[str]:
    """The unit's command: the split-cloud script of this environment, else this interpreter with -m."""
    beside = Path(sys.executable).parent / "split-cloud"
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "cloud_tier.cli"]


def cloud_unit(bundles: Path, user: str, serve_args: tuple[str, ...] = (), *, command: list[str] | None = None,
               gpu: bool = False, watchdog_s: int = 30, stop_timeout_s: int = 30) -> ServiceUnit:
    """The cloud node's ServiceUnit: `split-cloud serve` on `bundles` with the CA and fleet store in STATE_DIR;
    `gpu`: the tails run on a GPU, so the service sees /dev (PrivateDevices=no)."""
    argv = (*(command or split_cloud_command()), "serve", "--bundles", str(bundles), "--pki", str(STATE_DIR / "pki"),
            "--db", str(STATE_DIR / "fleet.db"), *serve_args)
    return ServiceUnit(
        name=SERVICE_NAME, description="splitinfer cloud node (split inference tails, fleet control plane)",
        exec_start=argv, user=user, watchdog_s=watchdog_s, stop_timeout_s=stop_timeout_s,
        read_only_paths=(str(bundles),), environment=(("SPLITINFER_STATE_DIR", str(STATE_DIR)),),
        private_devices=not gpu,
    )


@dataclass
class CloudInstall:
    """What install() did (or, with dry_run, would do): the unit, the files placed, the commands to run next."""

    unit_path: Path
    unit_text: str
    files: list[tuple[Path, int]] = field(default_factory=list)  # (path as installed, mode)
    warnings: list[str] = field(default_factory=list)
    created_user: bool = False
    user: str = DEFAULT_USER

    @property
    def next_steps(self) -> tuple[str, ...]:
        """The commands to run once the files are in place."""
        return (
            f"systemctl daemon-reload && systemctl enable --now {SERVICE_NAME}",
            f"systemctl status {SERVICE_NAME}; journalctl -u {SERVICE_NAME} -f",
            "split-cloud enroll / revoke DEVICE_ID --pki YOUR_CA_FOLDER   # the CA key stays there, never on the "
            "service; after a revoke, run this install again to refresh the service's CRL (it reloads it at once)",
        )

    @property
    def staging_steps(self) -> tuple[str, ...]:
        """What an image build must still do on the target for a --root install: the user, ownership, the binary."""
        state = STATE_DIR
        return (
            f"useradd --system --user-group --no-create-home --home-dir {state} --shell /usr/sbin/nologin "
            f"{self.user}",
            f"chown -R {self.user}:{self.user} {state}",
            "make sure the unit's ExecStart binary exists on the target (install splitinfer[cloud] at that path)",
            f"systemctl enable {SERVICE_NAME}",
        )


def _ensure_user(user: str) -> bool:
    """Create the system user (and its group) when missing; whether it was created."""
    try:
        return systemd.ensure_system_user(user, STATE_DIR)
    except systemd.SystemUserError as exc:
        raise InstallError(str(exc)) from None


def _place(root: Path, path: Path, mode: int, ids: tuple[int, int] | None, data: bytes | None = None) -> Path:
    """Make folder `path` (data None) or write file `path` under `root` with `mode`, owned by `ids` when given."""
    target = root / path.relative_to("/")
    if target.is_symlink():
        raise InstallError(f"{target} is a symbolic link; refusing to install through it")
    if data is None:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    os.chmod(target, mode)
    if ids is not None:
        os.chown(target, *ids, follow_symlinks=False)
    return target


def install(bundles: Path, pki: Path, *, user: str = DEFAULT_USER, serve_args: tuple[str, ...] = (),
            root: Path | None = None, dry_run: bool = False, command: list[str] | None = None,
            gpu: bool = False) -> CloudInstall:
    """Install the cloud node service (see the module doc); `dry_run` only renders the unit."""
    bundles = bundles.resolve()
    if not bundles.is_dir():
        raise InstallError(f"--bundles {bundles}: not a folder (make bundles with split-profile --out)")
    unit = cloud_unit(bundles, user, serve_args, command=command, gpu=gpu)
    result = CloudInstall(UNIT_DIR / f"{SERVICE_NAME}.service", unit.render(), user=user)
    hidden = {"/home": "ProtectHome=yes", "/root": "ProtectHome=yes", "/tmp": "PrivateTmp=yes",
              "/var/tmp": "PrivateTmp=yes"}
    for top, why in hidden.items():
        if bundles.is_relative_to(top) and root is None:
            result.warnings.append(f"{bundles} is under {top}, which the service cannot see ({why}): move the "
                                   "bundles, e.g. to /srv/splitinfer/bundles")
    if dry_run:
        return result
    if not (pki / "ca.pem").is_file() or not (pki / "server.pem").is_file():
        raise InstallError(f"--pki {pki}: no CA there; make one with `split-cloud ca init --dir {pki} --host NAME`")
    staging = root is not None
    if not staging and os.geteuid() != 0:
        raise InstallError("installing the service needs root (sudo), or --root DIR to stage into a folder, or "
                           "--print for the unit only")
    if not staging:
        result.created_user = _ensure_user(user)
    ids = None if staging else systemd.user_ids(user)
    base = root if root is not None else Path("/")
    _place(base, STATE_DIR, 0o750, ids)
    _place(base, STATE_DIR / "pki", 0o700, ids)
    for item in sorted(pki.rglob("*")):
        rel = item.relative_to(pki)
        if rel.parts[0] in NOT_SERVED or item.name in NOT_SERVED:
            continue  # the CA key and the device folders (with their keys) never go onto the serving node
        dest = STATE_DIR / "pki" / rel
        if item.is_symlink():
            raise InstallError(f"{item}: the CA folder holds a symbolic link; refusing to copy it")
        if item.is_dir():
            _place(base, dest, 0o700, ids)
            continue
        mode = 0o600 if item.name.endswith(PRIVATE_FILES) else 0o640
        _place(base, dest, mode, ids, item.read_bytes())
        result.files.append((dest, mode))
    _place(base, result.unit_path, 0o644, None if staging else (0, 0), result.unit_text.encode())
    result.files.append((result.unit_path, 0o644))
    if shutil.which("systemctl") is None and not staging:
        result.warnings.append("systemctl is not on PATH: is this a systemd host?")
    return result
