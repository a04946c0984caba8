"""`split-demo`: the whole system on one machine, on loopback.

It makes (or reuses) split bundles for two zoo models, starts the cloud node (gRPC tier, embedded MQTT broker,
fleet store, controller, dashboard), puts a link-emulating proxy in front of the cloud for each simulated device
(its own uplink rate and delay), and runs one `split-agent run` process per device, as an emulated device of its
label (`cloud_tier.lab.emulate`: a cgroup at the preset's calibrated CPU share, one core, its memory), so the
devices compute at a Pi's speed, not this host's. One device's uplink is set where its plan table chooses a
middle cut, so that the dashboard shows a real split; one's uplink swings across a boundary of its plan table
so that it switches cuts; one loses the cloud for a while and comes back. Ctrl-C (or `--duration`) stops everything in
order. Where cgroups cannot be made (not root), the devices run at host speed and the first line says so.
Bundles are made by `split-profile` and agents run as separate processes, because the cloud tier never imports
the partitioner or the edge agent, as on a real fleet.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_tier.lab import emulate
from cloud_tier.lab.linkproxy import LinkProxy
from cloud_tier.lab.process import child_env
from models.manifest import Bundle, BundleError


@dataclass(frozen=True)
class DemoDevice:
    """One simulated device: its bundle, emulated link and what happens to it."""

    device_id: str
    label: str
    bundle: str  # bundle directory name under the demo's bundles folder
    uplink_mbps: float
    downlink_mbps: float
    one_way_ms: float
    rate: float  # requests per second
    swing_mbps: float | None = None  # alternate the uplink between uplink_mbps and this every `period_s`
    outage: bool = False  # lose the cloud (blackhole, then reset) for part of every `period_s`
    preset: str = "rpi4"  # the emulated device its label names (cloud_tier.lab.emulate.PRESETS)
    on_split: bool = False  # its uplink is set where its plan table chooses a middle cut (see split_uplink)


@dataclass(frozen=True)
class DemoBundle:
    """A bundle the demo makes with split-profile."""

    name: str
    model: str
    device: str
    uplink_mbps: float
    rtt_ms: float


BUNDLES = (
    # Profiled for a Pi 4 on a low-latency link: MobileNetV2's plan table moves from edge-only through three
    # mid-graph cuts as the uplink grows; the small ViT flips between edge-only and cloud-only.
    DemoBundle("mobilenet_v2-rpi4", "mobilenet_v2", "rpi4", uplink_mbps=20.0, rtt_ms=2.0),
    DemoBundle("vit_tiny-rpi4", "vit_tiny", "rpi4", uplink_mbps=20.0, rtt_ms=2.0),
)

DEVICES = (
    DemoDevice("pi-kitchen", "Kitchen Pi 4 (Wi-Fi)", "mobilenet_v2-rpi4", 150.0, 200.0, 1.0, rate=4.0,
               on_split=True),
    DemoDevice("pi-garage", "Garage Pi 4 (flaky uplink)", "mobilenet_v2-rpi4", 20.0, 50.0, 1.0, rate=4.0,
               swing_mbps=2.0),
    DemoDevice("pi-porch", "Porch Pi 4 (4G)", "vit_tiny-rpi4", 5.85, 20.0, 1.0, rate=4.0),
    DemoDevice("pi-yard", "Yard Pi 4 (loses the cloud)", "vit_tiny-rpi4", 30.0, 50.0, 1.0, rate=4.0, outage=True),
)


def make_bundles(root: Path, say: Callable[[str], None], models: Sequence[DemoBundle] = BUNDLES) -> dict[str, Path]:
    """Profile each demo model into root/<name> with `split-profile`, reusing a bundle already there and intact."""
    paths = {}
    for spec in models:
        out = root / spec.name
        try:
            Bundle.load(out)
            say(f"bundle {spec.name}: reusing {out}")
        except BundleError:
            say(f"bundle {spec.name}: split-profile {spec.model} --device {spec.device} "
                f"--uplink-mbps {spec.uplink_mbps:g} --rtt-ms {spec.rtt_ms:g} (first run only)")
            _split_profile(spec, out)
        paths[spec.name] = out
    return paths


def _split_profile(spec: DemoBundle, out: Path) -> None:
    """Run split-profile for one demo bundle; RuntimeError with its last lines when it fails."""
    # Its warnings (synthetic calibration) go to stderr, which is kept only to explain a failure.
    cmd = [sys.executable, "-m", "partitioning.cli", spec.model, "--device", spec.device,
           "--uplink-mbps", f"{spec.uplink_mbps:g}", "--rtt-ms", f"{spec.rtt_ms:g}", "--out", str(out),
           "--repeats", "10", "--quiet"]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
                          env=child_env())
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"split-profile {spec.model} exited with {done.returncode}: {tail}")


# The agents' adaptive settings in the demo: probe and decide faster than the agent's defaults (2 s probes, 5 s
# dwell), so that a swing of the uplink shows as a cut switch within seconds, while you watch.
AGENT_TOML = """\
[adaptive]
enabled = true
min_dwell_s = 3.0
probe_interval_s = 0.5
min_samples = 3
"""


def swing_range(plan_table: Sequence[tuple[float, str]], fast: float, slow: float) -> tuple[float, str | None]:
    """The fast end of a swing that crosses a cut boundary of `plan_table`, and the boundary it crosses.

    When the plan table gives the same cut at `fast` and `slow`, the fast end is raised to four times the first
    uplink where the cut changes: the agent's hysteresis must be cleared, and its estimate errs low on a fast link
    (a small payload's transfer is short against the per-request overhead); (fast, None) when the table has one
    cut only.
    """
    rows = sorted(plan_table)

    def cut_at(mbps: float) -> str:
        return next((c for m, c in reversed(rows) if m <= mbps), rows[0][1])

    low = cut_at(slow)
    change = next((m for m, c in rows if m > slow and c != low), None)
    if change is None:
        return fast, None
    return (fast if cut_at(fast) != low and fast >= 4 * change else max(fast, 4 * change)), f"{change:g} Mbps"


MAX_PROXY_MBPS = 300.0  # the link proxy's own ceiling on this kind of host (edge_agent/bandwidth.py docstring)


def split_uplink(plan_table: Sequence[tuple[float, str]], fallback: float,
                 ceiling: float = MAX_PROXY_MBPS) -> tuple[float, str | None]:
    """An uplink at which the plan table chooses a middle cut (neither edge-only nor cloud-only), and that cut.

    The widest band of uplinks (consecutive rows) with the same middle cut is taken, up to `ceiling`, and its
    geometric middle returned, so that the agent's estimate, read with its hysteresis, stays inside the band;
    (fallback, None) when the table has no middle cut below the ceiling.
    """
    rows = sorted(plan_table)
    bands: list[tuple[float, float, str]] = []
    for i, (mbps, cut) in enumerate(rows):
        hi = rows[i + 1][0] if i + 1 < len(rows) else max(ceiling, 4 * mbps)
        if bands and bands[-1][2] == cut:
            bands[-1] = (bands[-1][0], hi, cut)
        else:
            bands.append((mbps, hi, cut))
    middle = [(lo, min(hi, ceiling), c) for lo, hi, c in bands if c not in ("edge-only", "cloud-only") and lo < ceiling]
    if not middle:
        return fallback, None
    lo, hi, cut = max(middle, key=lambda b: b[1] / (b[0] if b[0] > 0 else b[1] / 16))
    lo = lo if lo > 0 else hi / 16  # a band from 0: its middle within 4x of the top
    return round(math.sqrt(lo * hi), 1), cut


class _Scenario(threading.Thread):
    """Drives the proxies: bandwidth swings and outages, every `period_s`, until stopped."""

    def __init__(self, proxies: Mapping[str, LinkProxy], devices: Sequence[DemoDevice], period_s: float,
                 say: Callable[[str], None], fast: Mapping[str, float] | None = None):
        super().__init__(name="demo-scenario", daemon=True)
        self.proxies, self.devices, self.period_s, self.say = proxies, devices, period_s, say
        self.fast = dict(fast or {})  # device id -> the fast end of its swing (default its uplink_mbps)
        self.stopped = threading.Event()

    def run(self) -> None:
        slow = False
        while not self.stopped.wait(self.period_s / 2):
            slow = not slow
            for dev in self.devices:
                proxy = self.proxies[dev.device_id]
                if dev.swing_mbps is not None:
                    up = dev.swing_mbps if slow else self.fast.get(dev.device_id, dev.uplink_mbps)
                    proxy.set_rates(up, dev.downlink_mbps)
                    self.say(f"{dev.device_id}: uplink now {up:g} Mbps")
                if dev.outage:
                    if slow:
                        proxy.blackhole(True)
                        self.say(f"{dev.device_id}: cloud unreachable (link blackholed)")
                    else:
                        proxy.reset_all()
                        proxy.blackhole(False)
                        self.say(f"{dev.device_id}: cloud reachable again")

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


class _DemoNode:
    """Factory of the demo's cloud node: a CloudNode whose dashboard also shows the demo's own warnings."""

    @staticmethod
    def make(bundles_dir: Path, workdir: Path, notes: Sequence[str]) -> Any:
        from cloud_tier.config import NodeOptions, ServerConfig
        from cloud_tier.node import CloudNode

        class DemoNode(CloudNode):
            def warnings(self) -> list[str]:
                return [*super().warnings(), *notes]

        return DemoNode(bundles_dir, ServerConfig(pki_dir=workdir / "pki"), NodeOptions(db_path=workdir / "fleet.db"))


def emulation_status(enabled: bool = True) -> tuple[emulate.Cgroups | None, str]:
    """The cgroups the devices will run in (None: host speed) and the line that says which, and why."""
    if not enabled:
        return None, "devices run at host speed (--no-emulation): timings are this host's, not a Pi's"
    try:
        cgroups = emulate.Cgroups.detect()
        emulate.EmulatedDevice(emulate.Limits(), name="probe", cgroups=cgroups).close()
    except emulate.EmulationError as exc:
        why = str(exc).removeprefix("split-emulate: ").replace("run split-emulate as", "run split-demo as")
        return None, f"devices run at host speed, not as emulated devices (timings are this host's, not a Pi's): {why}"
    return cgroups, (f"devices run as emulated devices (cgroup {'v2' if cgroups.v2 else 'v1'}): each agent in its "
                     "own cgroup at its label's calibrated CPU share, one core and the device's memory; "
                     + emulate.NOT_EMULATED)


def _device_limits(devices: Sequence[DemoDevice], bundles: Mapping[str, Path], cgroups: emulate.Cgroups,
                   say: Callable[[str], None], cpu_share: float | None = None) -> dict[str, emulate.Limits]:
    """Each device's limits: its preset's CPU share (`cpu_share`, or calibrated with the model of the first device
    of that preset, cached per host), on one core (spread over the host's cores), with the preset's memory."""
    shares: dict[str, float] = {}
    limits = {}
    for i, dev in enumerate(devices):
        spec = emulate.preset(dev.preset)
        if cpu_share is not None and spec.name not in shares:
            say(f"{spec.name}: cpu share {cpu_share:g} set by hand (--cpu-share), not calibrated")
            shares[spec.name] = cpu_share
        if spec.name not in shares:
            model = next(b.model for b in BUNDLES if b.name == dev.bundle)
            cal = emulate.calibrate(spec.name, cgroups=cgroups, reference=(model, bundles[dev.bundle] / "full.onnx"),
                                    say=say)
            say(f"{spec.name}: {cal.describe()}")
            shares[spec.name] = cal.share
        limits[dev.device_id] = emulate.Limits(cpu_share=shares[spec.name], cores=1,
                                               memory_bytes=spec.memory_mb << 20,
                                               cpus=tuple(emulate.pick_cpus(1, offset=i)))
    return limits


def run_demo(workdir: Path, *, duration_s: float | None, period_s: float, devices: Sequence[DemoDevice] = DEVICES,
             say: Callable[[str], None] = print, emulation: bool = True, cpu_share: float | None = None) -> int:
    """Start everything, wait for Ctrl-C or `duration_s`, stop everything; returns the exit status."""
    cgroups, status_line = emulation_status(emulation)
    say(status_line)  # the first line: whether the devices are emulated, and why not
    workdir.mkdir(parents=True, exist_ok=True)
    bundles_dir = workdir / "bundles"
    wanted = {d.bundle for d in devices}
    bundles = make_bundles(bundles_dir, say, [b for b in BUNDLES if b.name in wanted])
    limits = _device_limits(devices, bundles, cgroups, say, cpu_share) if cgroups is not None else {}
    agent_toml = workdir / "agent.toml"
    agent_toml.write_text(AGENT_TOML)
    fast = {}
    for dev in devices:
        if dev.on_split:
            table = Bundle.load(bundles[dev.bundle]).plan_table
            fast[dev.device_id], cut = split_uplink(table, dev.uplink_mbps)
            say(f"{dev.device_id}: uplink {fast[dev.device_id]:g} Mbps, "
                + (f"where its plan table chooses the middle cut {cut}" if cut else
                   "(its plan table has no middle cut: it runs edge-only or cloud-only)"))
        if dev.swing_mbps is not None:
            table = Bundle.load(bundles[dev.bundle]).plan_table
            fast[dev.device_id], boundary = swing_range(table, dev.uplink_mbps, dev.swing_mbps)
            say(f"{dev.device_id}: uplink swings between {fast[dev.device_id]:g} and {dev.swing_mbps:g} Mbps"
                + (f" (its plan table changes cut at {boundary})" if boundary else
                   " (its plan table has one cut: it will not switch)"))
    device_tls = _enroll(workdir / "pki", [d.device_id for d in devices], say)
    node = _DemoNode.make(bundles_dir, workdir, [] if cgroups is not None else [status_line]).start()
    proxies: dict[str, LinkProxy] = {}
    agents: dict[str, subprocess.Popen] = {}
    emulated: list[emulate.EmulatedDevice] = []
    scenario = None
    status = 1
    try:
        for line in node.banner():
            say(line)
        assert node.broker_address is not None  # the control plane is on
        for dev in devices:
            proxy = LinkProxy(node.server.config.host, node.grpc_port,
                              uplink_mbps=fast.get(dev.device_id, dev.uplink_mbps),
                              downlink_mbps=dev.downlink_mbps, delay_ms=dev.one_way_ms)
            proxy.start()
            proxies[dev.device_id] = proxy
            count = int(dev.rate * duration_s) if duration_s else 10**9
            cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--bundle", str(bundles_dir / dev.bundle),
                   "--config", str(agent_toml), "--cloud", proxy.address, "--device-id", dev.device_id,
                   "--label", dev.label,
                   "--mqtt", node.broker_address, "--adaptive", "--rate", str(dev.rate), "--count", str(count),
                   "--quiet", "--log-level", "ERROR", *device_tls[dev.device_id]]
            popen: Callable[..., subprocess.Popen] = subprocess.Popen
            where = "at host speed"
            if cgroups is not None:
                device = emulate.EmulatedDevice(limits[dev.device_id], name=dev.device_id, cgroups=cgroups)
                emulated.append(device)
                popen = device.popen
                where = f"emulated {emulate.preset(dev.preset).name} ({limits[dev.device_id].describe()})"
            agents[dev.device_id] = popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True, env=child_env())
            say(f"agent {dev.device_id}: {dev.bundle}, {where}, uplink {fast.get(dev.device_id, dev.uplink_mbps):g} "
                f"Mbps, one-way delay "
                f"{dev.one_way_ms:g} ms" + (f", swings to {dev.swing_mbps:g} Mbps" if dev.swing_mbps else "")
                + (", loses the cloud periodically" if dev.outage else ""))
        scenario = _Scenario(proxies, devices, period_s, say, fast)
        scenario.start()
        say("")
        say(f"dashboard: {node.dashboard_url}   (Ctrl-C stops the demo)")
        deadline = time.monotonic() + duration_s if duration_s else None
        while deadline is None or time.monotonic() < deadline:
            dead = [d for d, p in agents.items() if p.poll() is not None]
            if dead and duration_s is None:
                proc = agents[dead[0]]
                say(f"agent {dead[0]} exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
                return 1
            if deadline is not None and all(p.poll() is not None for p in agents.values()):
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("\nstopping")
    finally:
        if scenario is not None:
            scenario.stop()
        status = _stop_agents(agents, say)
        for device in emulated:
            device.close()
        for proxy in proxies.values():
            proxy.stop()
        node.stop(grace=5.0)
        say("stopped: agents" + (" and their cgroups" if emulated else "")
            + ", link proxies, cloud tier, broker, dashboard")
    return status


def _enroll(pki: Path, device_ids: Sequence[str], say: Callable[[str], None]) -> dict[str, list[str]]:
    """The demo's CA in `pki` (made on the first run) and a certificate per device: each agent's --tls-* flags."""
    from cloud_tier.pki import CertificateAuthority

    if (pki / "ca.key").exists():
        ca = CertificateAuthority(pki)
    else:
        say(f"CA: split-cloud ca init --dir {pki} (first run only)")
        ca = CertificateAuthority.init(pki)
    flags = {}
    for device_id in device_ids:
        folder = pki / "devices" / device_id
        if not (folder / "device.pem").is_file():
            ca.enroll(device_id, folder)
        flags[device_id] = ["--tls-ca", str(folder / "ca.pem"), "--tls-cert", str(folder / "device.pem"),
                            "--tls-key", str(folder / "device.key")]
    return flags


def _stop_agents(agents: dict[str, subprocess.Popen], say: Callable[[str], None]) -> int:
    """SIGINT every agent (they drain and print a summary), then wait; the worst exit status."""
    for proc in agents.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    status = 0
    for device_id, proc in agents.items():
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        summary = [line for line in (out or "").splitlines() if line.strip()][-3:]
        say(f"agent {device_id} (exit {proc.returncode}): " + " | ".join(summary))
        if proc.returncode not in (0, -signal.SIGINT, 130):
            status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of split-demo."""
    ap = argparse.ArgumentParser(prog="split-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("SPLITINFER_DEMO_DIR", "splitinfer-demo")),
                    help="bundles and the fleet database live here (default ./splitinfer-demo)")
    ap.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    ap.add_argument("--period", type=float, default=40.0, help="seconds of one bandwidth-swing/outage cycle")
    ap.add_argument("--devices", help="comma-separated subset of " + ",".join(d.device_id for d in DEVICES))
    ap.add_argument("--no-emulation", action="store_true",
                    help="run the devices at host speed instead of as emulated devices (cgroups)")
    ap.add_argument("--cpu-share", type=float,
                    help="every emulated device at this share of a core, instead of its label's calibrated share")
    args = ap.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        ap.error("--duration must be positive")
    if args.period <= 0:
        ap.error("--period must be positive")
    if args.cpu_share is not None and not 0.001 <= args.cpu_share <= 1.0:
        ap.error("--cpu-share must be in [0.001, 1]")
    devices: Sequence[DemoDevice] = DEVICES
    if args.devices:
        names = [n.strip() for n in args.devices.split(",")]
        unknown = sorted(set(names) - {d.device_id for d in DEVICES})
        if unknown:
            ap.error(f"unknown devices {unknown}; choose from {[d.device_id for d in DEVICES]}")
        devices = tuple(d for d in DEVICES if d.device_id in names)
    try:
        return run_demo(args.workdir, duration_s=args.duration, period_s=args.period, devices=devices,
                        say=lambda msg: print(msg, flush=True), emulation=not args.no_emulation,
                        cpu_share=args.cpu_share)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"split-demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
