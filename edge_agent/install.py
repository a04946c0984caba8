"""`split-agent install`: the agent as a systemd service on a device.

    sudo split-agent install --config agent.toml          # unit + config + certificates + bundle, then systemctl
    split-agent install --config agent.toml --print       # only print the unit
    split-agent install --config agent.toml --root /tmp/image   # stage into a root (image builds, tests)

What it places (PREFIX is /etc/splitinfer by default; under --root DIR everything goes below DIR):
    PREFIX/agent.toml                 0640 root:USER   the config, its paths rewritten to the installed files
    PREFIX/tls/ca.pem, device.pem     0644 root:USER   ([tls]; [mqtt] tls_* files too, as mqtt-*.pem)
    PREFIX/tls/device.key             0600 USER:USER   the device's private key, readable by the service only
    PREFIX/bundle/...                 0644 / 0755      the split bundle
    /etc/systemd/system/splitinfer-agent.service      0644   the hardened Type=notify unit (models/systemd.py)
The service user (default splitinfer) is created with `useradd --system` when missing, only when installing
for real as root (not with --root). The local API's socket is /run/splitinfer-agent/agent.sock (0660, group
USER): add an application's user to that group to let it call the agent.
"""

from __future__ import annotations

import grp
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, ConfigError
from models import systemd
from models.systemd import ServiceUnit

try:
    import tomllib
except ImportError:  # Python 3.10: the `tomli` backport of the [edge] extra
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["SERVICE_NAME", "InstallError", "InstallPlan", "agent_unit", "install", "toml_text"]

SERVICE_NAME = "splitinfer-agent"
UNIT_DIR = Path("/etc/systemd/system")


class InstallError(RuntimeError):
    """Installation cannot go on (a missing file, not root, a bad prefix); the message says which."""


def split_agent_binary() -> str:
    """Absolute path of the split-agent command of this environment (the unit's ExecStart)."""
    beside = Path(sys.executable).parent / "split-agent"
    if beside.is_file():
        return str(beside)
    found = shutil.which("split-agent")
    if found is None:
        raise InstallError("cannot find the split-agent command (install splitinfer[edge] in this environment)")
    return str(Path(found).resolve())


def agent_unit(config_path: Path, user: str, *, binary: str | None = None, watchdog_s: int = 30,
               stop_timeout_s: int = 30, read_only: tuple[str, ...] = (), devices: bool = False) -> ServiceUnit:
    """The agent's ServiceUnit: `split-agent serve --config config_path` as `user` (`devices`: the onnxruntime
    providers need /dev, e.g. CUDA/TensorRT on a Jetson: PrivateDevices=no)."""
    return ServiceUnit(
        name=SERVICE_NAME, description="splitinfer edge agent (split inference service)",
        exec_start=(binary or split_agent_binary(), "serve", "--config", str(config_path)),
        user=user, watchdog_s=watchdog_s, stop_timeout_s=stop_timeout_s, read_only_paths=read_only,
        private_devices=not devices,
    )


def toml_text(data: dict[str, Any]) -> str:
    """A TOML document of a config mapping (strings, numbers, booleans, lists of those, one level of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise InstallError(f"cannot write {v!r} to TOML")

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@dataclass
class InstallPlan:
    """What install() did (or, with dry_run, would do): files placed, the unit, and the commands to run next."""

    unit_path: Path
    unit_text: str
    config_path: Path
    files: list[tuple[Path, int]] = field(default_factory=list)  # (path, mode)
    created_user: bool = False
    warnings: list[str] = field(default_factory=list)
    next_steps: tuple[str, ...] = (
        "systemctl daemon-reload && systemctl enable --now splitinfer-agent",
        "systemctl status splitinfer-agent; journalctl -u splitinfer-agent -f",
    )


def _ensure_user(user: str) -> bool:
    """Create the system user (and its group) when missing; whether it was created."""
    try:
        return systemd.ensure_system_user(user, f"/var/lib/{SERVICE_NAME}")
    except systemd.SystemUserError as exc:
        raise InstallError(str(exc)) from None


class _Placer:
    """Writes files under `root` with modes and (when `ids`) owners; never through a symlink."""

    def __init__(self, root: Path, ids: tuple[int, int] | None):
        self.root = root
        self.ids = ids  # (uid, gid) of the service user, or None (staging: no chown)
        self.placed: list[tuple[Path, int]] = []

    def host(self, path: Path) -> Path:
        return self.root / path.relative_to("/")

    def mkdir(self, path: Path, mode: int, owner: str = "root") -> None:
        target = self.host(path)
        if target.is_symlink():
            raise InstallError(f"{target} is a symlink; refusing to install through it")
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, mode)
        self._chown(target, owner)

    def write(self, path: Path, data: bytes, mode: int, owner: str = "root") -> None:
        target = self.host(path)
        if target.is_symlink():
            raise InstallError(f"{target} is a symlink; refusing to install through it")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._chown(Path(tmp), owner)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.placed.append((path, mode))

    def _chown(self, target: Path, owner: str) -> None:
        if self.ids is None:
            return
        uid, gid = self.ids
        os.chown(target, uid if owner == "user" else 0, gid, follow_symlinks=False)

    def tree(self, src: Path, dest: Path) -> None:
        self.mkdir(dest, 0o755)
        for item in sorted(src.rglob("*")):
            rel = dest / item.relative_to(src)
            if item.is_symlink():
                raise InstallError(f"{item}: the bundle contains a symlink; refusing to copy it")
            if item.is_dir():
                self.mkdir(rel, 0o755)
            elif item.is_file():
                self.write(rel, item.read_bytes(), 0o644)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InstallError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None


def install(config: Path, *, bundle: Path | None = None, user: str = "splitinfer",
            prefix: Path = Path("/etc/splitinfer"), root: Path | None = None, dry_run: bool = False,
            binary: str | None = None) -> InstallPlan:
    """Install the agent service (see the module doc); `dry_run` only renders the unit."""
    if not prefix.is_absolute():
        raise InstallError(f"--prefix must be an absolute path, got {str(prefix)!r}")
    try:
        cfg = AgentConfig.from_toml(config)  # validated, relative paths resolved against the file
        raw = tomllib.loads(config.read_text())
    except ConfigError as exc:
        raise InstallError(str(exc)) from None
    installed_cfg = prefix / "agent.toml"
    under_etc = prefix.parent == Path("/etc")
    devices = any(p != "CPUExecutionProvider" for p in cfg.providers)
    # systemd's stop timeout outlasts the drain (plus the telemetry flush and offline publish), so SIGKILL never
    # cuts a drain short (raise drain_timeout_s later with SIGHUP and the unit needs installing again).
    stop_timeout_s = max(30, math.ceil(cfg.service.drain_timeout_s) + 10)
    unit = agent_unit(installed_cfg, user, binary=binary, read_only=() if under_etc else (str(prefix),),
                      devices=devices, stop_timeout_s=stop_timeout_s)
    plan = InstallPlan(UNIT_DIR / f"{SERVICE_NAME}.service", unit.render(), installed_cfg)
    exe = unit.exec_start[0]
    if exe.startswith(("/home/", "/root/")):
        plan.warnings.append(f"{exe} is under a home folder, which the unit hides (ProtectHome=yes): install "
                             "splitinfer[edge] into a venv outside /home and /root (e.g. /opt/splitinfer)")
    if dry_run:
        return plan
    staging = root is not None
    if not staging and os.geteuid() != 0:
        raise InstallError("installing the service needs root (sudo), or --root DIR to stage into a folder, "
                           "or --print for the unit only")
    if not staging:
        plan.created_user = _ensure_user(user)
    ids = systemd.user_ids(user) if not staging else None
    if ids is not None:
        try:
            grp.getgrgid(ids[1])
        except KeyError:
            ids = None
    placer = _Placer(root if root is not None else Path("/"), ids)
    placer.mkdir(prefix, 0o750)
    data: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    src_bundle = bundle or cfg.bundle
    if not (src_bundle / "plan.json").is_file():
        raise InstallError(f"bundle {src_bundle}: not a split bundle folder (no plan.json)")
    placer.tree(src_bundle, prefix / "bundle")
    data["bundle"] = str(prefix / "bundle")
    tls_dir = prefix / "tls"
    if cfg.tls is not None or (cfg.mqtt is not None and cfg.mqtt.tls is not None):
        placer.mkdir(tls_dir, 0o750)
    if cfg.tls is not None:
        tls = dict(data.get("tls", {}))
        for key, name, mode, owner in (("ca", "ca.pem", 0o644, "root"), ("cert", "device.pem", 0o644, "root"),
                                       ("key", "device.key", 0o600, "user")):
            placer.write(tls_dir / name, _read(getattr(cfg.tls, key), f"[tls] {key}"), mode, owner)
            tls[key] = str(tls_dir / name)
        data["tls"] = tls
    if cfg.mqtt is not None and cfg.mqtt.tls is not None:
        mqtt = dict(data.get("mqtt", {}))
        for key, src, mode, owner in (("tls_ca", cfg.mqtt.tls[0], 0o644, "root"),
                                      ("tls_cert", cfg.mqtt.tls[1], 0o644, "root"),
                                      ("tls_key", cfg.mqtt.tls[2], 0o600, "user")):
            name = f"mqtt-{key[4:]}.{'key' if key == 'tls_key' else 'pem'}"
            placer.write(tls_dir / name, _read(Path(src), f"[mqtt] {key}"), mode, owner)
            mqtt[key] = str(tls_dir / name)
        data["mqtt"] = mqtt
    placer.write(installed_cfg, toml_text(data).encode(), 0o640)
    placer.write(plan.unit_path, plan.unit_text.encode(), 0o644)
    plan.files = placer.placed
    return plan
