"""`split-demo`: the whole system on one machine, on loopback.

It makes (or reuses) split bundles for two zoo models, starts the cloud node (gRPC tier, embedded MQTT broker,
fleet store, controller, dashboard), puts a link-emulating proxy in front of the cloud for each simulated device
(its own uplink rate and delay), and runs one `split-agent run` process per device. One device's uplink swings
between fast and slow so that it switches cuts; one loses the cloud for a while and comes back. Ctrl-C (or
`--duration`) stops everything in order. Bundles are made by `split-profile` and agents run as separate
processes, because the cloud tier never imports the partitioner or the edge agent, as on a real fleet.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    DemoDevice("pi-kitchen", "Kitchen Pi 4 (fast Wi-Fi)", "mobilenet_v2-rpi4", 60.0, 100.0, 1.0, rate=4.0),
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


class _Scenario(threading.Thread):
    """Drives the proxies: bandwidth swings and outages, every `period_s`, until stopped."""

    def __init__(self, proxies: Mapping[str, LinkProxy], devices: Sequence[DemoDevice], period_s: float,
                 say: Callable[[str], None]):
        super().__init__(name="demo-scenario", daemon=True)
        self.proxies, self.devices, self.period_s, self.say = proxies, devices, period_s, say
        self.stopped = threading.Event()

    def run(self) -> None:
        slow = False
        while not self.stopped.wait(self.period_s / 2):
            slow = not slow
            for dev in self.devices:
                proxy = self.proxies[dev.device_id]
                if dev.swing_mbps is not None:
                    up = dev.swing_mbps if slow else dev.uplink_mbps
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


def run_demo(workdir: Path, *, duration_s: float | None, period_s: float, devices: Sequence[DemoDevice] = DEVICES,
             say: Callable[[str], None] = print) -> int:
    """Start everything, wait for Ctrl-C or `duration_s`, stop everything; returns the exit status."""
    from cloud_tier.config import NodeOptions, ServerConfig
    from cloud_tier.node import CloudNode

    workdir.mkdir(parents=True, exist_ok=True)
    bundles_dir = workdir / "bundles"
    wanted = {d.bundle for d in devices}
    make_bundles(bundles_dir, say, [b for b in BUNDLES if b.name in wanted])
    device_tls = _enroll(workdir / "pki", [d.device_id for d in devices], say)
    node = CloudNode(bundles_dir, ServerConfig(pki_dir=workdir / "pki"),
                     NodeOptions(db_path=workdir / "fleet.db")).start()
    proxies: dict[str, LinkProxy] = {}
    agents: dict[str, subprocess.Popen] = {}
    scenario = None
    try:
        for line in node.banner():
            say(line)
        assert node.broker_address is not None  # the control plane is on
        for dev in devices:
            proxy = LinkProxy(node.server.config.host, node.grpc_port, uplink_mbps=dev.uplink_mbps,
                              downlink_mbps=dev.downlink_mbps, delay_ms=dev.one_way_ms)
            proxy.start()
            proxies[dev.device_id] = proxy
            count = int(dev.rate * duration_s) if duration_s else 10**9
            cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--bundle", str(bundles_dir / dev.bundle),
                   "--cloud", proxy.address, "--device-id", dev.device_id, "--label", dev.label,
                   "--mqtt", node.broker_address, "--adaptive", "--rate", str(dev.rate), "--count", str(count),
                   "--quiet", "--log-level", "ERROR", *device_tls[dev.device_id]]
            agents[dev.device_id] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, start_new_session=True, env=child_env())
            say(f"agent {dev.device_id}: {dev.bundle}, uplink {dev.uplink_mbps:g} Mbps, one-way delay "
                f"{dev.one_way_ms:g} ms" + (f", swings to {dev.swing_mbps:g} Mbps" if dev.swing_mbps else "")
                + (", loses the cloud periodically" if dev.outage else ""))
        scenario = _Scenario(proxies, devices, period_s, say)
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
        for proxy in proxies.values():
            proxy.stop()
        node.stop(grace=5.0)
        say("stopped: agents, link proxies, cloud tier, broker, dashboard")
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
    args = ap.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        ap.error("--duration must be positive")
    if args.period <= 0:
        ap.error("--period must be positive")
    devices: Sequence[DemoDevice] = DEVICES
    if args.devices:
        names = [n.strip() for n in args.devices.split(",")]
        unknown = sorted(set(names) - {d.device_id for d in DEVICES})
        if unknown:
            ap.error(f"unknown devices {unknown}; choose from {[d.device_id for d in DEVICES]}")
        devices = tuple(d for d in DEVICES if d.device_id in names)
    try:
        return run_demo(args.workdir, duration_s=args.duration, period_s=args.period, devices=devices,
                        say=lambda msg: print(msg, flush=True))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"split-demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
