"""The device emulator's pure parts: limits, cgroup layouts (v1 and v2 on fake trees), presets, link schedules."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cloud_tier.lab import emulate
from cloud_tier.lab.emulate import Cgroups, EmulationError, Limits, LinkSchedule, parse_schedule
from tests import polling


def test_limits_period_and_quota():
    assert Limits(cpu_share=0.25).period_quota_us() == (20_000, 5_000)
    assert Limits(cpu_share=0.25, cores=2).period_quota_us() == (20_000, 10_000)
    # The quota never drops below the kernel's 1 ms: the period grows instead.
    period, quota = Limits(cpu_share=0.01).period_quota_us()
    assert quota == 1_000 and period == 100_000
    for bad in ({"cpu_share": 0}, {"cpu_share": 1.5}, {"cores": 0}, {"memory_bytes": 10},
                {"cores": 2, "cpus": (0,)}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            Limits(**bad)


def test_sizes_and_cpu_lists():
    assert emulate.parse_bytes("512M") == 512 << 20 and emulate.parse_bytes("2G") == 2 << 30
    assert emulate.parse_bytes("1048576") == 1 << 20 and emulate.parse_bytes("1.5GiB") == 3 << 29
    with pytest.raises(ValueError, match="memory"):
        emulate.parse_bytes("lots")
    assert emulate.format_bytes(4 << 30) == "4G"
    assert emulate.parse_cpu_list("0-2,5") == [0, 1, 2, 5]


def test_presets_and_aliases():
    assert emulate.preset("RPI4").name == "rpi4" and emulate.preset("jetson").name == "jetson-orin-nano"
    assert "GPU" in emulate.preset("jetson-nano").note
    with pytest.raises(ValueError, match="rpi4"):
        emulate.preset("pdp11")


def _v2_tree(root: Path, controllers: str = "cpu cpuset memory io") -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("cpu memory\n")
    proc = root.parent / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/\n")
    return proc


def test_v2_group_gets_cpu_max_cpuset_and_memory_max(tmp_path, monkeypatch):
    proc = _v2_tree(tmp_path / "cg")
    monkeypatch.setattr(emulate, "pick_cpus", lambda cores, offset=0: list(range(cores)))
    cgroups = Cgroups.detect(tmp_path / "cg", proc)
    assert cgroups.v2
    original = Path.mkdir

    def mkdir_with_files(self: Path, *a, **k):  # the kernel makes a new group's files
        original(self, *a, **k)
        for f in ("cpu.max", "cpuset.cpus", "memory.max", "memory.swap.max", "cgroup.procs"):
            (self / f).write_text("")

    monkeypatch.setattr(Path, "mkdir", mkdir_with_files)
    group = cgroups.create(Limits(cpu_share=0.2, cores=2, memory_bytes=512 << 20), "rpi4")
    (d,) = group.dirs
    assert (d / "cpu.max").read_text() == "8000 20000"
    assert (d / "cpuset.cpus").read_text() == "0,1"
    assert (d / "memory.max").read_text() == str(512 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert "+cpuset" in (tmp_path / "cg" / "cgroup.subtree_control").read_text()
    assert group.procs_files == [d / "cgroup.procs"]


class _KernelFiles:
    """A fake cgroupfs: a new group directory gets the kernel's files, and every write is recorded (a process
    written to cgroup.procs leaves the group it was in, as the kernel moves it)."""

    FILES = ("cpu.max", "cpuset.cpus", "cpuset.mems", "memory.max", "memory.swap.max", "cgroup.procs",
             "cgroup.controllers", "cgroup.subtree_control", "cpu.cfs_period_us", "cpu.cfs_quota_us",
             "memory.limit_in_bytes")

    def __init__(self, monkeypatch, root: Path):
        self.writes: list[tuple[Path, str]] = []
        self.root = root
        original_mkdir, original_write = Path.mkdir, emulate._write

        def mkdir(path: Path, *a, **k):
            existed = path.is_dir()
            original_mkdir(path, *a, **k)
            if not existed and root in path.parents:
                for f in self.FILES:
                    (path / f).write_text("")

        def write(path: Path, value: str) -> None:
            self.writes.append((path, value))
            if path.name == "cgroup.procs":  # the kernel moves the process: it leaves every other group
                for other in root.rglob("cgroup.procs"):
                    left = [p for p in other.read_text().split() if p != value]
                    other.write_text("\n".join(left))
                value = "\n".join([*path.read_text().split(), value])
            if path.name == "cgroup.subtree_control":  # the kernel lists the enabled controllers by name
                value = " ".join(sorted({*path.read_text().split(), *(c.lstrip("+") for c in value.split())}))
            original_write(path, value)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        monkeypatch.setattr(emulate, "_write", write)
        monkeypatch.setattr(emulate, "pick_cpus", lambda cores, offset=0: list(range(cores)))


def test_v2_from_a_non_root_group_moves_its_processes_into_a_leaf_first(tmp_path, monkeypatch):
    # We run in /user.slice/app.scope with two processes: cgroup v2 lets a non-root group enable controllers for
    # its children only while it holds no process itself, so they move into the leaf splitinfer-launcher first.
    proc = _v2_tree(tmp_path / "cg")
    scope = tmp_path / "cg" / "user.slice" / "app.scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.controllers").write_text("cpu cpuset memory\n")
    (scope / "cgroup.subtree_control").write_text("\n")
    (scope / "cgroup.procs").write_text("4242\n4343\n")
    (proc / "cgroup").write_text("0::/user.slice/app.scope\n")
    kernel = _KernelFiles(monkeypatch, tmp_path / "cg")
    cgroups = Cgroups.detect(tmp_path / "cg", proc)
    assert cgroups.parents == {"": scope}
    assert cgroups.leaf_move() == (scope, [4242, 4343])  # what split-emulate says before it moves them
    group = cgroups.create(Limits(cpu_share=0.5, memory_bytes=64 << 20), "pi")
    assert cgroups.leaf_move() is None  # moved, and the controllers are enabled: nothing more moves
    leaf = scope / emulate.LAUNCHER_GROUP
    assert leaf.is_dir() and leaf.name in {p.name for p in scope.iterdir()}
    assert sorted((leaf / "cgroup.procs").read_text().split()) == ["4242", "4343"]
    assert (scope / "cgroup.procs").read_text().split() == []
    order = [p for p, _ in kernel.writes]
    # The moves come before the controllers are enabled, which come before the device's limits.
    assert order.index(leaf / "cgroup.procs") < order.index(scope / "cgroup.subtree_control") \
        < order.index(group.dirs[0] / "cpu.max")
    assert group.dirs == (scope / group.name,) and (group.dirs[0] / "cpu.max").read_text() == "10000 20000"
    # A second device (or an emulator started from inside the leaf) makes its group beside the first.
    (proc / "cgroup").write_text(f"0::/user.slice/app.scope/{emulate.LAUNCHER_GROUP}\n")
    again = Cgroups.detect(tmp_path / "cg", proc)
    assert again.parents == {"": scope}
    second = again.create(Limits(cpu_share=0.5), "pi")
    assert second.dirs[0].parent == scope and not (leaf / emulate.LAUNCHER_GROUP).exists()
    assert (scope / "cgroup.subtree_control").read_text() == "cpu cpuset memory"


def test_v2_at_the_root_group_moves_nothing(tmp_path, monkeypatch):
    proc = _v2_tree(tmp_path / "cg")
    (tmp_path / "cg" / "cgroup.procs").write_text("1\n4242\n")  # the root group is exempt from the rule
    _KernelFiles(monkeypatch, tmp_path / "cg")
    cgroups = Cgroups.detect(tmp_path / "cg", proc)
    assert cgroups.leaf_move() is None
    group = cgroups.create(Limits(cpu_share=0.5), "pi")
    assert not (tmp_path / "cg" / emulate.LAUNCHER_GROUP).exists()
    assert group.dirs == (tmp_path / "cg" / group.name,)


def test_v1_group_gets_quota_period_cpuset_and_memory_in_each_controller(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    for ctl, probe in (("cpu,cpuacct", "cpu.cfs_quota_us"), ("memory", "memory.limit_in_bytes"),
                       ("cpuset", "cpuset.cpus")):
        (root / ctl).mkdir(parents=True)
        (root / ctl / probe).write_text("")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("4:memory:/\n3:cpuset:/\n1:cpu,cpuacct:/\n0::/\n")
    _KernelFiles(monkeypatch, root)
    group = Cgroups.detect(root, proc).create(Limits(cpu_share=0.25, cores=2, memory_bytes=256 << 20), "rpi4")
    cpu, mem, cpuset = (root / c / group.name for c in ("cpu,cpuacct", "memory", "cpuset"))
    assert set(group.dirs) == {cpu, mem, cpuset}
    assert (cpu / "cpu.cfs_period_us").read_text() == "20000" and (cpu / "cpu.cfs_quota_us").read_text() == "10000"
    assert (cpuset / "cpuset.cpus").read_text() == "0,1" and (cpuset / "cpuset.mems").read_text() == "0"
    assert (mem / "memory.limit_in_bytes").read_text() == str(256 << 20)
    assert sorted(group.procs_files) == sorted(d / "cgroup.procs" for d in (cpu, mem, cpuset))


def test_v2_without_the_cpu_controller_says_so(tmp_path):
    proc = _v2_tree(tmp_path / "cg", controllers="memory pids")
    with pytest.raises(EmulationError, match=r"lacks the cpu controller.*root") as err:
        Cgroups.detect(tmp_path / "cg", proc)
    assert "\n" not in str(err.value)


def test_v1_layout_uses_each_controllers_mount_and_own_path(tmp_path):
    root = tmp_path / "cg"
    for ctl, probe in (("cpu,cpuacct", "cpu.cfs_quota_us"), ("memory", "memory.limit_in_bytes"),
                       ("cpuset", "cpuset.cpus")):
        (root / ctl).mkdir(parents=True)
        (root / ctl / probe).write_text("")
    (root / "memory" / "box").mkdir()
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("4:memory:/box\n3:cpuset:/\n1:cpu,cpuacct:/\n0::/\n")
    cgroups = Cgroups.detect(root, proc)
    assert not cgroups.v2
    assert cgroups.parents == {"cpu": root / "cpu,cpuacct", "memory": root / "memory" / "box",
                               "cpuset": root / "cpuset"}


def test_no_cgroups_is_one_line_with_how_to_get_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(emulate.ENV_CGROUP_ROOT, str(tmp_path / "missing"))
    assert emulate.main(["--cpu-share", "0.5", "--", "true"]) == emulate.EXIT_NO_CGROUP
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "as root" in err


def test_device_limits_by_hand_and_preset_memory():
    limits, how = emulate.device_limits("rpi4", slowdown=8.0)
    assert limits.cpu_share == pytest.approx(0.125) and limits.memory_bytes == 4096 << 20 and "--slowdown" in how
    limits, how = emulate.device_limits(None, cpu_share=0.3, memory_bytes=64 << 20)
    assert limits.cpu_share == 0.3 and limits.memory_bytes == 64 << 20
    with pytest.raises(ValueError, match="not both"):
        emulate.device_limits("rpi4", cpu_share=0.3, slowdown=2.0)
    with pytest.raises(ValueError, match="--device"):
        emulate.device_limits(None)


def test_calibration_is_cached_per_host(tmp_path, monkeypatch):
    cache = tmp_path / "cal.json"
    calls = []
    monkeypatch.setattr(emulate, "reference_model", lambda workdir, say: tmp_path / "ref.onnx")
    monkeypatch.setattr(emulate, "predicted_ms", lambda model, device: 100.0)
    monkeypatch.setattr(emulate, "time_reference", lambda model, runs=10, join=(): 20.0)

    def inside(model, limits, cgroups, runs):
        calls.append(limits.cpu_share)
        return 20.0 / limits.cpu_share * 1.25  # the group costs a quarter more than the share says

    monkeypatch.setattr(emulate, "_time_inside", inside)
    fake = Cgroups(False, {})
    cal = emulate.calibrate("rpi4", cgroups=fake, cache=cache, say=lambda _m: None)
    assert calls[0] == pytest.approx(0.2) and cal.share == pytest.approx(0.25, rel=0.02)
    assert "rpi4 predicted 100.0 ms -> share 0.25" in cal.describe()
    again = emulate.calibrate("rpi4", cgroups=fake, cache=cache, say=lambda _m: None)
    assert again == cal and len(calls) == 2  # from the cache
    # The jetson-nano preset is slower than the Pi 4 it derives from.
    nano = emulate.calibrate("jetson-nano", cgroups=fake, cache=cache, say=lambda _m: None)
    assert nano.target_ms == pytest.approx(100.0 / 0.7) and nano.share < cal.share
    # ... by the ratio the table states: the Pi 4's share times the Jetson core's speed, with no timing of its own.
    assert nano.share == pytest.approx(cal.share * 0.7, rel=0.01) and len(calls) == 2
    assert "rpi4 x 0.7" in nano.describe()


def test_link_schedule_parses_and_applies_in_order():
    steps = parse_schedule("0:wifi, 0.05:3g,0.1:2")
    assert [s.name for _, s in steps] == ["wifi", "3g", "2 Mbps"]
    assert steps[1][1].uplink_mbps == 1.1 and steps[1][1].one_way_ms == 50.0
    for bad in ("5:wifi", "0:wifi,0:3g", "0:nowhere", "wifi", "0:-1"):
        with pytest.raises(ValueError):
            parse_schedule(bad)

    class Proxy:
        def __init__(self):
            self.rates, self.lock = [], threading.Lock()

        def set_rates(self, up, down):
            with self.lock:
                self.rates.append(up)

        def set_delay(self, ms):
            pass

    proxy = Proxy()
    schedule = LinkSchedule(proxy, steps, say=lambda _m: None)
    schedule.start()
    polling.wait_for(lambda: len(proxy.rates) == 3, "all three link states applied", 10)
    schedule.stop()
    assert proxy.rates == [18.88, 1.1, 2.0]
    with pytest.raises(ValueError, match="repeat"):
        LinkSchedule(proxy, steps, repeat_s=0.1)


def test_demo_says_on_its_first_line_why_devices_run_at_host_speed(tmp_path, monkeypatch):
    from cloud_tier.lab import demo

    monkeypatch.setenv(emulate.ENV_CGROUP_ROOT, str(tmp_path / "missing"))
    cgroups, line = demo.emulation_status()
    assert cgroups is None and line.startswith("devices run at host speed") and "as root" in line
    assert demo.emulation_status(enabled=False)[1].startswith("devices run at host speed (--no-emulation)")


def test_demo_swing_crosses_the_plan_tables_boundary():
    from cloud_tier.lab.demo import swing_range

    table = [(0.5, "edge-only"), (20.0, "edge-only"), (50.0, "c038"), (100.0, "c021")]
    assert swing_range(table, 20.0, 2.0) == (200.0, "50 Mbps")
    assert swing_range(table, 300.0, 2.0) == (300.0, "50 Mbps")
    assert swing_range([(0.5, "edge-only")], 20.0, 2.0) == (20.0, None)


def test_demo_puts_a_device_where_its_plan_table_chooses_a_middle_cut():
    from cloud_tier.lab.demo import split_uplink

    table = [(0.5, "edge-only"), (2.0, "c038"), (5.0, "c038"), (10.0, "c021"), (20.0, "c021"), (50.0, "c021"),
             (100.0, "cloud-only")]
    assert split_uplink(table, 150.0) == (31.6, "c021")  # the widest middle band, 10-100 Mbps, at its middle
    assert split_uplink([(0.5, "edge-only"), (8.0, "c1"), (500.0, "cloud-only")], 150.0) == (49.0, "c1")  # to 300
    assert split_uplink([(0.5, "edge-only"), (20.0, "cloud-only")], 150.0) == (150.0, None)
    assert split_uplink([(0.5, "edge-only"), (500.0, "c1")], 150.0) == (150.0, None)  # above the proxy's ceiling
