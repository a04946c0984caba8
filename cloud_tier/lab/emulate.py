"""`split-emulate`: run a command as an emulated edge device on this machine (a lab tool).

A cgroup limits the command (and everything it starts): CPU time (cgroup v2 `cpu.max`, or v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`), the cores it may run on (cpuset, with the onnxruntime thread count to
match) and its memory (v2 `memory.max`, v1 `memory.limit_in_bytes`). Which cgroup version the host has is
detected at run time. The group is removed when the command exits, also when it fails or is killed; groups left
by an emulator that was itself killed are swept on the next start.

A CPU share s gives each emulated core s of a host core's time, in slices of a short period (20 ms), so a
compute-bound run takes about 1/s as long. A preset (`--device rpi4`) calibrates s: a reference model
(the zoo's mobilenet_v2, full model, fp32, one thread) is timed here at full speed and then inside the group,
so that it runs at the latency the device table (`partitioning.devices`, roofline) predicts for that device's
CPU. The result is cached per host in the state dir for a day. A preset whose CPU is given relative to another
preset's (jetson-nano: ~0.7x a Pi 4 core) takes that preset's calibrated share times its speed.

Not emulated: a Jetson's GPU (only its CPU cores: an emulated Jetson runs what the agent runs on the CPU),
thermal throttling, memory bandwidth and cache sizes (the host's are used: memory-bound layers keep the host's
ratio to compute), the int8 speed-up of the device's instruction set (the host's), storage and radio power.

Links: `--link-to HOST:PORT` puts a `LinkProxy` in front of HOST:PORT with a named network profile (3g, 4g,
wifi, ...) or a schedule of them (`--link-schedule "0:wifi,30:3g,60:wifi"`); `{link}` in the command is replaced
by the proxy's address (also in $SPLITINFER_EMULATED_LINK).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_tier.lab.process import child_env

EXIT_NO_CGROUP = 3  # the emulation could not be set up: nothing was run
GROUP_PREFIX = "splitinfer-emu-"
PERIOD_US = 20_000  # CPU slices of 20 ms: short enough that a 10 ms request feels the share, not the period
MIN_QUOTA_US = 1_000  # the kernel's smallest quota
CACHE_TTL_S = 24 * 3600.0
REFERENCE_MODEL = "mobilenet_v2"
ENV_DEVICE = "SPLITINFER_EMULATED_DEVICE"
ENV_CORES = "SPLITINFER_EMULATED_CORES"
ENV_LINK = "SPLITINFER_EMULATED_LINK"
ENV_CGROUP_ROOT = "SPLITINFER_CGROUP_ROOT"  # where the cgroup filesystem is (default /sys/fs/cgroup)
# cgroup v2: a non-root group whose controllers are enabled for its children may hold no process itself ("no
# internal processes"), so the processes of the group the emulator starts in move into this leaf first.
LAUNCHER_GROUP = "splitinfer-launcher"
HOW_TO = ("run split-emulate as root (sudo), or in a container with a writable /sys/fs/cgroup "
          "(docker --privileged, or a delegated cgroup v2 subtree: systemd-run --scope -p Delegate=yes)")


class EmulationError(RuntimeError):
    """The emulated device could not be set up; the message is one line that says what is missing and how to get it."""


# --- presets -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """A named device: the device-table entry its CPU latency is derived from, and its memory."""

    name: str
    table: str  # partitioning.devices entry whose (CPU) roofline prediction gives the target latency
    speed: float  # this device's CPU speed relative to `table`'s (1.0: the same CPU)
    memory_mb: int
    cpu: str
    note: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("rpi4", "rpi4", 1.0, 4096, "4x Cortex-A72 1.5 GHz"),
        Preset("rpi5", "rpi5", 1.0, 8192, "4x Cortex-A76 2.4 GHz"),
        # The device table describes a Jetson's GPU; its CPU is derived from the Pi with the nearest core
        # (approximate: clock ratio x per-clock speed of the core, from public SPEC/Geekbench-class comparisons).
        Preset("jetson-nano", "rpi4", 0.7, 4096, "4x Cortex-A57 1.43 GHz",
               "CPU only (its Maxwell GPU is not emulated); speed ~0.7x a Pi 4 core (1.43/1.5 GHz x ~0.75 per clock, "
               "approximate)"),
        Preset("jetson-orin-nano", "rpi5", 0.7, 8192, "6x Cortex-A78AE 1.5 GHz",
               "CPU only (its Ampere GPU is not emulated); speed ~0.7x a Pi 5 core (1.5/2.4 GHz x ~1.1 per clock, "
               "approximate)"),
    )
}
ALIASES = {"rpi": "rpi5", "jetson": "jetson-orin-nano"}
NOT_EMULATED = ("not emulated: a Jetson's GPU (CPU cores only), thermal throttling, memory bandwidth and caches, "
                "the device's int8/fp16 instruction speed-ups (the host's apply)")


def preset(name: str) -> Preset:
    """The preset named `name` (aliases and case allowed)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown device {name!r}: expected one of {', '.join(sorted([*PRESETS, *ALIASES]))}")
    return PRESETS[key]


# --- limits and cgroups ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What the emulated device may use: `cpu_share` of each of `cores` host cores, and `memory_bytes`."""

    cpu_share: float = 1.0
    cores: int = 1
    memory_bytes: int | None = None
    cpus: tuple[int, ...] = ()  # which host cores (empty: the first `cores` of this process's affinity)

    def __post_init__(self) -> None:
        share = self.cpu_share
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.001 <= share <= 1.0:
            raise ValueError(f"cpu_share: expected a fraction of a core's time in [0.001, 1], got {share!r}")
        if not isinstance(self.cores, int) or isinstance(self.cores, bool) or not 1 <= self.cores <= 1024:
            raise ValueError(f"cores: expected an integer in [1, 1024], got {self.cores!r}")
        if self.memory_bytes is not None and (not isinstance(self.memory_bytes, int) or self.memory_bytes < 4 << 20):
            raise ValueError(f"memory_bytes: expected at least 4 MiB, got {self.memory_bytes!r}")
        if self.cpus and len(self.cpus) != self.cores:
            raise ValueError(f"cpus: expected {self.cores} core numbers (cores), got {list(self.cpus)}")

    def period_quota_us(self) -> tuple[int, int]:
        """The CFS period and quota: `cpu_share * cores` of the period, the period grown to keep the quota >= 1 ms."""
        period = max(PERIOD_US, math.ceil(MIN_QUOTA_US / (self.cpu_share * self.cores)))
        return period, max(MIN_QUOTA_US, round(self.cpu_share * self.cores * period))

    def describe(self) -> str:
        """One line for the output."""
        mem = "no memory limit" if self.memory_bytes is None else f"memory {format_bytes(self.memory_bytes)}"
        on = f" (host cpus {','.join(map(str, self.cpus))})" if self.cpus else ""
        return f"cpu share {self.cpu_share:.3f} of {self.cores} core{'s' if self.cores > 1 else ''}{on}, {mem}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"memory: expected a size like 512M or 2G, got {text!r}")
    scale = 1024 ** " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * scale)


def format_bytes(n: int) -> str:
    """Bytes as the largest binary unit that divides them to one decimal."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g}{unit}" if n % scale == 0 else f"{n / scale:.1f}{unit}"
    return f"{n}B"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read().strip()


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]."""
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


@dataclass
class Group:
    """One emulated device's cgroup: a directory per controller (v1) or one directory (v2)."""

    name: str
    dirs: tuple[Path, ...]
    v2: bool

    @property
    def procs_files(self) -> list[Path]:
        """Where a process writes its pid to join the group."""
        return [d / "cgroup.procs" for d in self.dirs]

    def pids(self) -> set[int]:
        """The processes in the group now."""
        found: set[int] = set()
        for f in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in _read(f).split())
        return found

    def add(self, pid: int) -> None:
        """Move process `pid` into the group."""
        for f in self.procs_files:
            _write(f, str(pid))

    def remove(self, timeout: float = 10.0) -> None:
        """Kill whatever still runs in the group and remove its directories; OSError when they stay."""
        deadline = time.monotonic() + timeout
        kill_file = self.dirs[0] / "cgroup.kill"
        while True:
            pids = self.pids()
            if self.v2 and pids and kill_file.exists():
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            left = []
            for d in self.dirs:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise OSError(f"cgroup {d} could not be removed: {exc.strerror}") from exc
                    left.append(d)
            if not left:
                return
            time.sleep(0.02)  # the killed processes are leaving the group


@dataclass(frozen=True)
class Cgroups:
    """The host's cgroup layout: v2 (one directory) or v1 (cpu, cpuset, memory controllers), found at run time."""

    v2: bool
    parents: Mapping[str, Path]  # controller -> the directory new groups are made in
    root: Path | None = None  # the cgroup filesystem (v2: its root group is exempt from "no internal processes")

    @classmethod
    def detect(cls, root: Path | None = None, proc: Path = Path("/proc/self")) -> Cgroups:
        """This host's cgroups ($SPLITINFER_CGROUP_ROOT, default /sys/fs/cgroup); EmulationError (one line: what is
        missing and how to get it) when unusable."""
        root = Path(root or os.environ.get(ENV_CGROUP_ROOT) or "/sys/fs/cgroup")
        if os.name != "posix" or not root.is_dir():
            raise EmulationError(f"split-emulate: no cgroup filesystem at {root} (Linux cgroups are needed); {HOW_TO}")
        own = _own_cgroups(proc)
        if (root / "cgroup.controllers").is_file():  # cgroup v2 (unified)
            base = root / own.get("", "/").lstrip("/")
            if base.name == LAUNCHER_GROUP:  # moved there by an emulator before: its groups are the leaf's siblings
                base = base.parent
            have = set(_read(base / "cgroup.controllers").split()) if (base / "cgroup.controllers").is_file() else set()
            missing = {"cpu", "memory"} - have
            if missing:
                raise EmulationError(f"split-emulate: cgroup v2 at {base} lacks the {', '.join(sorted(missing))} "
                                     f"controller(s) (has: {' '.join(sorted(have)) or 'none'}); {HOW_TO}")
            return cls(True, {"": base}, root)
        parents = {}
        for controller, probe in (("cpu", "cpu.cfs_quota_us"), ("memory", "memory.limit_in_bytes"),
                                  ("cpuset", "cpuset.cpus")):
            mount = _v1_mount(root, controller, probe)
            if mount is None:
                raise EmulationError(f"split-emulate: no cgroup v1 {controller} controller (no {probe} under {root}) "
                                     f"and no cgroup v2; mount it, or {HOW_TO}")
            rel = own.get(controller, "/").lstrip("/")
            parents[controller] = mount / rel if (mount / rel).is_dir() else mount
        return cls(False, parents, root)

    def leaf_move(self) -> tuple[Path, list[int]] | None:
        """(group, its pids) when making a device's group will first move every process of the group the emulator
        started in (not only this one: the shell, a service, whatever else runs there) into its leaf
        LAUNCHER_GROUP (cgroup v2, a non-root group whose controllers are not yet enabled for its children); None
        when nothing will move. They keep running with the same limits: the leaf is a child of that group."""
        if not self.v2:
            return None
        parent = self.parents[""]
        if self.root is not None and parent.resolve() == Path(self.root).resolve():
            return None
        try:
            wanted = {"cpu", "memory", "cpuset"} & set(_read(parent / "cgroup.controllers").split())
            if not wanted - set(_read(parent / "cgroup.subtree_control").split()):
                return None
            pids = [int(x) for x in _read(parent / "cgroup.procs").split()]
        except (OSError, ValueError):  # unreadable: making the group says what is wrong
            return None
        return (parent, pids) if pids else None

    def create(self, limits: Limits, tag: str = "") -> Group:
        """A new group with `limits`; EmulationError when the host does not let us make one."""
        sweep_stale(self)
        name = f"{GROUP_PREFIX}{os.getpid()}-{tag or 'dev'}-{next(_COUNTER)}"
        cpus = limits.cpus or tuple(pick_cpus(limits.cores))
        dirs = tuple(p / name for p in self.parents.values())
        made: list[Path] = []
        try:
            for d in dirs:
                d.mkdir()
                made.append(d)
            period, quota = limits.period_quota_us()
            cpu_list = ",".join(map(str, cpus))
            if self.v2:
                self._enable_v2(dirs[0].parent, self.root)
                _write(dirs[0] / "cpu.max", f"{quota} {period}")
                if (dirs[0] / "cpuset.cpus").exists():
                    _write(dirs[0] / "cpuset.cpus", cpu_list)
                if limits.memory_bytes is not None:
                    _write(dirs[0] / "memory.max", str(limits.memory_bytes))
                    if (dirs[0] / "memory.swap.max").exists():
                        _write(dirs[0] / "memory.swap.max", "0")
            else:
                cpu, mem, cpuset = (self.parents[c] / name for c in ("cpu", "memory", "cpuset"))
                _write(cpu / "cpu.cfs_period_us", str(period))
                _write(cpu / "cpu.cfs_quota_us", str(quota))
                _write(cpuset / "cpuset.mems", _read(cpuset.parent / "cpuset.mems"))
                _write(cpuset / "cpuset.cpus", cpu_list)
                if limits.memory_bytes is not None:
                    _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
                    if (mem / "memory.memsw.limit_in_bytes").exists():  # no swapping past the limit
                        _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        except OSError as exc:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            where = exc.filename or (made[-1] if made else dirs[0])
            raise EmulationError(f"split-emulate: cannot create the device's cgroup ({where}: "
                                 f"{exc.strerror or exc}); {HOW_TO}") from None
        return Group(name, dirs, self.v2)

    @staticmethod
    def _enable_v2(parent: Path, root: Path | None = None) -> None:
        """Enable cpu, memory and cpuset for `parent`'s children. A non-root group that still holds processes
        cannot ("no internal processes"): they move into the leaf LAUNCHER_GROUP first, beside the devices."""
        control = parent / "cgroup.subtree_control"
        enabled = set(_read(control).split())
        wanted = {"cpu", "memory", "cpuset"} & set(_read(parent / "cgroup.controllers").split())
        if not wanted - enabled:
            return
        if root is None or parent.resolve() != Path(root).resolve():
            move_to_leaf(parent)
        _write(control, " ".join(f"+{c}" for c in sorted(wanted - enabled)))


_COUNTER = iter(range(1, 1 << 62))


def move_to_leaf(group: Path) -> list[int]:
    """Move every process of cgroup v2 `group` into its leaf LAUNCHER_GROUP (made when missing); the pids moved.
    A process that has left meanwhile is skipped."""
    pids = [int(p) for p in _read(group / "cgroup.procs").split()] if (group / "cgroup.procs").is_file() else []
    if not pids:
        return []
    leaf = group / LAUNCHER_GROUP
    leaf.mkdir(exist_ok=True)
    moved = []
    for pid in pids:
        try:
            _write(leaf / "cgroup.procs", str(pid))
        except ProcessLookupError:
            continue
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
            continue
        moved.append(pid)
    return moved


def _own_cgroups(proc: Path) -> dict[str, str]:
    """controller -> this process's cgroup path ('' for v2), from /proc/self/cgroup."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in _read(proc / "cgroup").splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                own[c] = path
    return own


def _v1_mount(root: Path, controller: str, probe: str) -> Path | None:
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if controller in d.name.split(",") and (d / probe).exists():
            return d
    return None


def pick_cpus(cores: int, offset: int = 0) -> list[int]:
    """`cores` of the cores this process may run on, starting at `offset` (round robin)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cores > len(allowed):
        raise ValueError(f"cores: {cores} asked, this host lets us use {len(allowed)}")
    return [allowed[(offset + i) % len(allowed)] for i in range(cores)]


def sweep_stale(cgroups: Cgroups) -> list[str]:
    """Remove groups left by an emulator that died (its pid is gone); their names."""
    swept = []
    for parent in cgroups.parents.values():
        with contextlib.suppress(OSError):
            for d in parent.iterdir():
                match = re.match(rf"^{GROUP_PREFIX}(\d+)-", d.name)
                if not match or _alive(int(match.group(1))):
                    continue
                group = Group(d.name, tuple(p / d.name for p in cgroups.parents.values()), cgroups.v2)
                with contextlib.suppress(OSError):
                    group.remove(timeout=2.0)
                    swept.append(d.name)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- running a command as the device -----------------------------------------------------------------------------

class EmulatedDevice:
    """A cgroup with `limits`; `popen()` starts commands inside it; `close()` kills what is left and removes it.

    >>> with EmulatedDevice(Limits(cpu_share=0.2, memory_bytes=512 << 20), name="rpi4") as dev:
    ...     dev.popen(["python", "-c", "..."]).wait()
    """

    def __init__(self, limits: Limits, *, name: str = "device", cgroups: Cgroups | None = None):
        self.limits, self.name = limits, name
        self.cgroups = cgroups or Cgroups.detect()
        self.group: Group | None = self.cgroups.create(limits, re.sub(r"[^A-Za-z0-9_-]", "_", name)[:32])

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a process of this device: thread counts matched to its cores."""
        env = dict(os.environ if base is None else base)
        cores = str(self.limits.cores)
        env.update({ENV_DEVICE: self.name, ENV_CORES: cores, "OMP_NUM_THREADS": cores,
                    "MKL_NUM_THREADS": cores, "OPENBLAS_NUM_THREADS": cores})
        return env

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` behind a shell that joins the group and then execs it: it runs inside from its first instruction."""
        if self.group is None:
            raise RuntimeError("EmulatedDevice is closed")
        joins = " && ".join(f"echo $$ > {shlex.quote(str(f))}" for f in self.group.procs_files)
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "sh", *cmd]

    def popen(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
        """subprocess.Popen of `cmd` inside the device (its environment from `env()`)."""
        return subprocess.Popen(self.wrap(cmd), env=self.env(env), **kwargs)

    def close(self) -> None:
        """Kill every process still in the group and remove it (idempotent)."""
        group, self.group = self.group, None
        if group is not None:
            group.remove()

    def __enter__(self) -> EmulatedDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- calibration -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """The CPU share that makes the reference run at the device's predicted latency, and how it was found."""

    device: str
    share: float
    host_ms: float
    target_ms: float
    measured_ms: float  # the reference inside the group at `share`
    reference: str
    created: float = field(default_factory=time.time)
    derived_from: str = ""  # "rpi4 x 0.7": the share of that preset's calibration times this preset's speed

    def describe(self) -> str:
        """The line the output shows."""
        if self.derived_from:
            return (f"calibrated: the {self.derived_from.split()[0]} calibration ({self.reference} at 1 thread, host "
                    f"{self.host_ms:.1f} ms) scaled by this CPU's speed ({self.derived_from}): {self.device} "
                    f"predicted {self.target_ms:.1f} ms -> share {self.share:.3f}")
        return (f"calibrated: {self.reference} at 1 thread, host {self.host_ms:.1f} ms, {self.device} predicted "
                f"{self.target_ms:.1f} ms -> share {self.share:.3f} (measured inside at that share: "
                f"{self.measured_ms:.1f} ms)")


def _state_dir() -> Path:
    from cloud_tier.config import default_state_dir

    return default_state_dir()


def host_key() -> str:
    """What identifies this host's CPU for the calibration cache."""
    model = ""
    with contextlib.suppress(OSError):
        for line in _read(Path("/proc/cpuinfo")).splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}|{model or platform.processor()}|{os.cpu_count()}"


def reference_model(workdir: Path, say: Callable[[str], None] = print) -> Path:
    """The reference ONNX (the zoo's mobilenet_v2, full model), exported once into `workdir`."""
    out = workdir / f"{REFERENCE_MODEL}.onnx"
    if out.is_file():
        return out
    from models.loaders import load_model

    say(f"calibration: exporting the zoo's {REFERENCE_MODEL} to ONNX (first run only)")
    loaded = load_model(REFERENCE_MODEL, workdir / "export")
    os.replace(loaded.onnx_path, out)
    return out


def predicted_ms(model: Path, table_device: str) -> float:
    """The device table's roofline latency of `model` (fp32) on `table_device`: what the planner predicts."""
    import onnx

    from partitioning.devices import device_from_table
    from partitioning.estimate import estimate_node_costs

    return float(estimate_node_costs(onnx.load(str(model)), device_from_table(table_device)).total_ms())


def time_reference(model: Path, runs: int = 10, join: Sequence[Path] = ()) -> float:
    """Median ms of `runs` runs of `model` at one thread; with `join`, first move this process into a cgroup
    (after loading, so only the runs are limited)."""
    import numpy as np

    from models.ortopts import make_session

    session = make_session(model, threads=1)
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(2):
        session.run(None, feed)
    for f in join:
        _write(f, str(os.getpid()))
    if join:
        session.run(None, feed)  # the first run inside pays for the move
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(sorted(times)[len(times) // 2])


def _time_inside(model: Path, limits: Limits, cgroups: Cgroups, runs: int) -> float:
    """The reference's median ms in a child process inside a group with `limits`."""
    with EmulatedDevice(limits, name="calibrate", cgroups=cgroups) as dev:
        assert dev.group is not None
        cmd = [sys.executable, "-m", "cloud_tier.lab.emulate", "--time-reference", str(model), "--runs", str(runs),
               "--join", *map(str, dev.group.procs_files)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env(), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"calibration run failed ({done.returncode}): {done.stderr.strip()[-400:]}")
        return float(done.stdout.strip().splitlines()[-1])


def calibrate(device: str, *, cgroups: Cgroups | None = None, cache: Path | None = None,
              reference: tuple[str, Path] | None = None, refresh: bool = False,
              say: Callable[[str], None] = print) -> Calibration:
    """The CPU share that makes the reference run on the emulated `device` at the table's predicted latency.

    Method: time the reference here at full speed (host_ms) and take the table's roofline prediction for the
    device's CPU (target_ms = prediction / preset speed); start at share host_ms / target_ms, time the reference
    inside a group at that share and correct the share by measured / target, until within 10% (at most 4
    tries; the closest is kept). Cached per host for a day. `reference`: (name, ONNX path) of another model to
    calibrate with (e.g. the model the device will run) instead of the zoo's mobilenet_v2.
    """
    spec = preset(device)
    base = next((p for p in PRESETS.values() if p.table == spec.table and p.speed == 1.0 and p is not spec), None)
    if spec.speed != 1.0 and base is not None:
        # A CPU described relative to another preset's (a Jetson's cores against a Pi's) shares its calibration:
        # one timing fewer, and the two stay in the ratio the table states however noisy the host was.
        cal = calibrate(base.name, cgroups=cgroups, cache=cache, reference=reference, refresh=refresh, say=say)
        return Calibration(spec.name, round(min(1.0, max(0.005, cal.share * spec.speed)), 4), cal.host_ms,
                           cal.target_ms / spec.speed, cal.measured_ms / spec.speed, cal.reference,
                           derived_from=f"{base.name} x {spec.speed:g}")
    cgroups = cgroups or Cgroups.detect()
    cache = cache or _state_dir() / "emulate-calibration.json"
    ref_name = reference[0] if reference else REFERENCE_MODEL
    key = f"{spec.name}|{ref_name}|{host_key()}"
    entries: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        entries = json.loads(cache.read_text())
    hit = entries.get(key)
    if hit and not refresh and time.time() - float(hit.get("created", 0)) < CACHE_TTL_S:
        with contextlib.suppress(TypeError, ValueError):
            return Calibration(**hit)
    model = reference[1] if reference else reference_model(cache.parent / "emulate-reference", say)
    target = predicted_ms(model, spec.table) / spec.speed
    host = time_reference(model, runs=20)
    share = min(1.0, max(0.005, host / target))
    say(f"calibrating {spec.name}: reference {ref_name} host {host:.1f} ms, target {target:.1f} ms, "
        f"trying share {share:.3f}")
    runs = max(5, min(15, int(3000 / target)))
    best: tuple[float, float] | None = None  # (share, measured) closest to the target so far
    for _ in range(4):
        measured = _time_inside(model, Limits(cpu_share=share, cores=1), cgroups, runs)
        if best is None or abs(math.log(measured / target)) < abs(math.log(best[1] / target)):
            best = (share, measured)
        if abs(measured / target - 1.0) <= 0.1:
            break
        share = min(1.0, max(0.005, share * measured / target))
    assert best is not None
    share, measured = best
    result = Calibration(spec.name, round(share, 4), host, target, measured, f"{ref_name} full fp32")
    entries[key] = result.__dict__
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, cache)
    return result


def device_limits(device: str | None, *, cpu_share: float | None = None, slowdown: float | None = None,
                  cores: int = 1, memory_bytes: int | None = None, cpus: Sequence[int] = (),
                  cgroups: Cgroups | None = None, refresh: bool = False,
                  say: Callable[[str], None] = print) -> tuple[Limits, str]:
    """The limits of a preset (calibrated, or `cpu_share` / `slowdown` by hand) and a line saying how the share
    was set."""
    if cpu_share is not None and slowdown is not None:
        raise ValueError("give --cpu-share or --slowdown, not both")
    if slowdown is not None:
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown: expected a factor >= 1, got {slowdown!r}")
        cpu_share, how = 1.0 / slowdown, f"cpu share 1/{slowdown:g} set by hand (--slowdown)"
    elif cpu_share is not None:
        how = f"cpu share {cpu_share:g} set by hand (--cpu-share)"
    elif device is None:
        raise ValueError("give --device (a preset, calibrated) or --cpu-share / --slowdown")
    else:
        cal = calibrate(device, cgroups=cgroups, refresh=refresh, say=say)
        cpu_share, how = cal.share, cal.describe()
    if memory_bytes is None and device is not None:
        memory_bytes = preset(device).memory_mb << 20
    return Limits(cpu_share=cpu_share, cores=cores, memory_bytes=memory_bytes, cpus=tuple(cpus)), how


# --- links -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinkState:
    """One link setting: rates and one-way delay."""

    name: str
    uplink_mbps: float
    downlink_mbps: float
    one_way_ms: float


def network(name: str) -> LinkState:
    """A named network profile of the device table (3g, 4g, wifi, 5g, ethernet), or 'UP' Mbps of uplink."""
    from partitioning.devices import resolve_network

    try:
        mbps = float(name)
    except ValueError:
        net = resolve_network(name)
        return LinkState(net.name, net.uplink_mbps, net.downlink_mbps, net.rtt_ms / 2.0)
    if not mbps > 0:
        raise ValueError(f"link: expected a network name or an uplink in Mbps > 0, got {name!r}")
    return LinkState(f"{mbps:g} Mbps", mbps, max(mbps, 20.0), 1.0)


def parse_schedule(text: str) -> list[tuple[float, LinkState]]:
    """'0:wifi,30:3g,60:2' -> [(0, wifi), (30, 3g), (60, 2 Mbps up)], times in seconds, increasing, from 0."""
    steps = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        at, sep, what = part.partition(":")
        try:
            t = float(at)
        except ValueError:
            t = math.nan
        if not sep or not t >= 0:
            raise ValueError(f"link schedule: expected SECONDS:PROFILE items like 0:wifi,30:3g, got {part!r}")
        steps.append((t, network(what.strip())))
    if not steps or steps[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(steps, steps[1:])):
        raise ValueError(f"link schedule: expected increasing times starting at 0, got {text!r}")
    return steps


class LinkSchedule(threading.Thread):
    """Applies a schedule of link states to a LinkProxy (repeating every `repeat_s` when given) until stopped."""

    def __init__(self, proxy: Any, steps: Sequence[tuple[float, LinkState]], *, repeat_s: float | None = None,
                 say: Callable[[str], None] = print, tag: str = "link"):
        super().__init__(name=f"link-schedule-{tag}", daemon=True)
        if repeat_s is not None and not repeat_s > steps[-1][0]:
            raise ValueError(f"link repeat: expected a period longer than the schedule's last time, got {repeat_s}")
        self.proxy, self.steps, self.repeat_s, self.say, self.tag = proxy, list(steps), repeat_s, say, tag
        self.stopped = threading.Event()

    def apply(self, state: LinkState) -> None:
        """Set the proxy to `state` now."""
        self.proxy.set_rates(state.uplink_mbps, state.downlink_mbps)
        self.proxy.set_delay(state.one_way_ms)
        self.say(f"{self.tag}: link now {state.name} (up {state.uplink_mbps:g} / down {state.downlink_mbps:g} Mbps, "
                 f"one-way {state.one_way_ms:g} ms)")

    def run(self) -> None:
        start = time.monotonic()
        while True:
            for at, state in self.steps:
                if self.stopped.wait(max(0.0, start + at - time.monotonic())):
                    return
                self.apply(state)
            if self.repeat_s is None:
                return
            start += self.repeat_s

    def stop(self) -> None:
        """Stop applying (the proxy keeps its last state)."""
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=5)


@contextlib.contextmanager
def emulated_link(target: str, steps: Sequence[tuple[float, LinkState]], *, repeat_s: float | None = None,
                  say: Callable[[str], None] = print, tag: str = "link") -> Iterator[Any]:
    """A LinkProxy in front of `target` (host:port) following `steps`; yields the proxy."""
    from cloud_tier.config import parse_address
    from cloud_tier.lab.linkproxy import LinkProxy

    host, port = parse_address(target, "link-to")
    first = steps[0][1]
    proxy = LinkProxy(host, port, uplink_mbps=first.uplink_mbps, downlink_mbps=first.downlink_mbps,
                      delay_ms=first.one_way_ms)
    proxy.start()
    schedule = LinkSchedule(proxy, steps, repeat_s=repeat_s, say=say, tag=tag)
    schedule.start()
    try:
        yield proxy
    finally:
        schedule.stop()
        proxy.stop()


# --- CLI ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of split-emulate."""
    ap = argparse.ArgumentParser(
        prog="split-emulate",
        description="Run COMMAND as an emulated edge device: a cgroup limits its CPU share, cores and memory; "
                    "optionally a link proxy with a network profile in front of the cloud.",
        epilog="example: split-emulate --device rpi4 --link-to 127.0.0.1:50051 --link-schedule 0:wifi,30:3g -- "
               "split-agent run --bundle B --cloud {link} ...   (" + NOT_EMULATED + ")")
    ap.add_argument("--device", help="preset: " + ", ".join(PRESETS) + " (CPU share calibrated, memory from the table)")
    share = ap.add_mutually_exclusive_group()
    share.add_argument("--cpu-share", type=float, help="fraction of each core's time (0.001-1), instead of calibrating")
    share.add_argument("--slowdown", type=float, help="run this many times slower (= --cpu-share 1/X)")
    ap.add_argument("--cores", type=int, default=1, help="cores of the device (default 1: the agent's one thread)")
    ap.add_argument("--cpus", help="which host cores, e.g. 0 or 0-1 (default: the first --cores)")
    ap.add_argument("--memory", help="memory limit, e.g. 512M, 2G (default: the preset's memory)")
    ap.add_argument("--recalibrate", action="store_true", help="calibrate again instead of using the cached share")
    ap.add_argument("--link-to", metavar="HOST:PORT", help="put a link proxy in front of this address ({link})")
    ap.add_argument("--link", help="network profile of the link: 3g, 4g, wifi, 5g, ethernet, or uplink Mbps")
    ap.add_argument("--link-schedule", help='changes over time, "SECONDS:PROFILE,...", e.g. "0:wifi,30:3g,60:wifi"')
    ap.add_argument("--link-repeat", type=float, metavar="S", help="repeat the schedule every S seconds")
    ap.add_argument("--time-reference", type=Path, help=argparse.SUPPRESS)  # calibration worker
    ap.add_argument("--runs", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--join", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of split-emulate: the command's exit status, or 3 when the device could not be emulated."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.time_reference is not None:
        print(f"{time_reference(args.time_reference, args.runs, [Path(p) for p in args.join]):.3f}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    if args.link and args.link_schedule:
        ap.error("give --link or --link-schedule, not both")
    if (args.link or args.link_schedule) and not args.link_to:
        ap.error("--link / --link-schedule need --link-to HOST:PORT (the cloud the proxy forwards to)")

    def say(msg: str) -> None:
        print(f"split-emulate: {msg}", file=sys.stderr, flush=True)

    try:
        steps = parse_schedule(args.link_schedule or f"0:{args.link or 'ethernet'}") if args.link_to else []
        memory = parse_bytes(args.memory) if args.memory else None
        cpus = parse_cpu_list(args.cpus) if args.cpus else ()
        if args.device is not None:
            preset(args.device)
        cgroups = Cgroups.detect()
        if (moving := cgroups.leaf_move()) is not None:
            say(f"moving the {len(moving[1])} processes of cgroup {moving[0]} (the group this started in, this "
                f"shell's too) into its leaf {LAUNCHER_GROUP}: cgroup v2 lets a group that limits its children hold "
                "no process itself; they keep the same limits")
        EmulatedDevice(Limits(), name="probe", cgroups=cgroups).close()  # can we make groups? before saying more
        limits, how = device_limits(args.device, cpu_share=args.cpu_share, slowdown=args.slowdown, cores=args.cores,
                                    memory_bytes=memory, cpus=cpus, cgroups=cgroups, refresh=args.recalibrate, say=say)
    except EmulationError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_NO_CGROUP
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"split-emulate: error: {exc}", file=sys.stderr)
        return 2
    name = preset(args.device).name if args.device else "custom"
    say(f"device {name}: {limits.describe()}; {how}")
    say(NOT_EMULATED)
    if limits.cores > 1:
        say(f"{limits.cores} cores: $OMP_NUM_THREADS and ${ENV_CORES} are {limits.cores}; give onnxruntime as many "
            f"threads: split-agent config intra_op_threads = {limits.cores}, split-profile --threads {limits.cores}")
    return _run(command, limits, name, cgroups, args, steps, say)


def _run(command: list[str], limits: Limits, name: str, cgroups: Cgroups, args: argparse.Namespace,
         steps: list[tuple[float, LinkState]], say: Callable[[str], None]) -> int:
    with contextlib.ExitStack() as stack:
        try:
            device = stack.enter_context(EmulatedDevice(limits, name=name, cgroups=cgroups))
        except EmulationError as exc:
            print(str(exc), file=sys.stderr)
            return EXIT_NO_CGROUP
        env = device.env()
        if steps:
            proxy = stack.enter_context(emulated_link(args.link_to, steps, repeat_s=args.link_repeat, say=say))
            env[ENV_LINK] = proxy.address
            command = [a.replace("{link}", proxy.address) for a in command]
        forwarded: list[int] = []
        started: list[subprocess.Popen] = []

        def forward(signum: int, _frame: Any) -> None:
            forwarded.append(signum)
            for child in started:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

        # The handlers go in before the command starts: a signal in between is not lost, and the command gets
        # default dispositions (a signal our parent ignored would otherwise stay ignored in it across exec).
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            proc = device.popen(command, env=env)
            started.append(proc)
            for signum in forwarded:  # arrived while it was starting
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)
            code = proc.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        return code if code >= 0 else 128 - code
    return 1  # pragma: no cover (ExitStack does not swallow)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
