"""Split vs edge-only vs cloud-only end-to-end latency over emulated 3G, 4G and Wi-Fi uplinks.

The agent reaches `split-cloud serve` (its own process, max_batch 1: no batching window on a lone request)
through a LinkProxy shaped like each network profile of `partitioning.devices` (uplink / downlink Mbit/s,
one-way delay = RTT / 2). For each link and each cut (the bundle's middle cut, edge-only, cloud-only) one
agent runs `--requests` sequential requests; the table shows median end-to-end latency, the median upload
bytes, the fastest mode per link, what the bundle's plan table would pick at that uplink, and the agent's own
uplink estimate (edge_agent/bandwidth.py, with a calibration probe after every other request, untimed) next to
the proxy's rate: the estimator's accuracy is measured, not assumed. Edge compute
is this x86 host, not a Raspberry Pi: on a Pi the head (and edge-only) would be several times slower, which
moves the balance towards the cloud; the link times are what the proxy enforces.

    python -m benchmarks.bandwidth [--models mobilenet_v2,resnet18] [--networks 3g,4g,wifi] [--requests 12]
                                   [--bundles DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import bench_pki, bundles_dir, host_line, make_bundle, median, mid_cut, table
from cloud_tier.lab.linkproxy import LinkProxy
from cloud_tier.lab.process import CloudProcess
from edge_agent import EdgeAgent
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle
from partitioning.devices import resolve_network


def run_mode(path: Path, address: str, cut: str, codec_spec: str, x: np.ndarray, requests: int,
             warmup: int, tls: Any) -> tuple[float, float, float | None]:
    """Median e2e ms, median upload bytes of `requests` sequential requests on `cut`, and the agent's uplink
    estimate after them (None on edge-only: nothing is sent)."""
    agent = EdgeAgent.from_bundle(path, cloud=address, cut=cut, codec=codec_spec, deadline_ms=60_000,
                                  connect_timeout_s=10.0, device_id="bench", tls=tls)
    try:
        if cut != EDGE_ONLY and not agent.wait_for_mode("split", 60):
            raise RuntimeError(f"agent on {cut} never reached the cloud: {agent.stats().extra}")
        lat, sent = [], []
        for i in range(warmup + requests):
            t0 = time.perf_counter()
            res = agent.infer(x, timeout=120)
            ms = (time.perf_counter() - t0) * 1000
            if cut != EDGE_ONLY and res.served_by != "cloud":
                raise RuntimeError(f"{cut}: served by {res.served_by} ({res.fallback_reason})")
            if i >= warmup:
                lat.append(ms)
                sent.append(res.sent_bytes)
            if cut != EDGE_ONLY and i % 2:  # untimed, as AdaptiveCut sends them: the fixed-cost fit
                agent.measure_rtt()
                agent.probe_link(cut, calibration=True)
        return median(lat), median(sent), agent.bandwidth.estimate().mbps if cut != EDGE_ONLY else None
    finally:
        agent.close()


def main(argv: list[str] | None = None) -> int:
    """Run the bandwidth benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mobilenet_v2,resnet18", help="comma-separated: tiny or zoo names")
    ap.add_argument("--networks", default="3g,4g,wifi", help="network profiles (partitioning.devices)")
    ap.add_argument("--requests", type=int, default=12, help="measured requests per (link, mode)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--codec", default="int8", help="activation codec (default %(default)s)")
    ap.add_argument("--bundles", help="directory to build bundles in and reuse (default: a temp dir)")
    args = ap.parse_args(argv)
    nets = [resolve_network(n.strip()) for n in args.networks.split(",") if n.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="splitinfer-bandwidth-") as tmp:
        root = bundles_dir(args.bundles, tmp)
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        paths = {m: make_bundle(m, root) for m in models}
        pki, tls = bench_pki(Path(tmp))
        with CloudProcess(root, "--max-batch", "1", "--cpu-only", "--log-level", "WARNING", pki=pki) as cloud, \
                LinkProxy("127.0.0.1", cloud.port) as proxy:
            for model in models:
                bundle = Bundle.load(paths[model])
                split = mid_cut(bundle)
                x = np.random.default_rng(0).standard_normal(bundle.inputs[0].concrete_shape(1)).astype(np.float32)
                side = bundle.plan.get("device")  # the test bundle (tiny) records only a device name
                device = side.get("name", "?") if isinstance(side, dict) else str(side or "?")
                est = bundle.candidate(EDGE_ONLY).get("edge_ms") if any(
                    c["id"] == EDGE_ONLY for c in bundle.plan["candidates"]) else None
                edge_est = f"{est:.0f} ({device})" if isinstance(est, (int, float)) else "n/a"
                edge_ms, _, _ = run_mode(paths[model], proxy.address, EDGE_ONLY, args.codec, x, args.requests,
                                      args.warmup, tls)
                for net in nets:
                    proxy.set_rates(net.uplink_mbps, net.downlink_mbps)
                    proxy.set_delay(net.rtt_ms / 2)
                    res: dict[str, tuple[float, float, float | None]] = {EDGE_ONLY: (edge_ms, 0.0, None)}
                    for cut in (split, CLOUD_ONLY):
                        res[cut] = run_mode(paths[model], proxy.address, cut, args.codec, x, args.requests,
                                            args.warmup, tls)
                    best = min(res, key=lambda c: res[c][0])
                    print(f"# {model} {net.name}: " + ", ".join(f"{c} {v[0]:.0f} ms" for c, v in res.items()),
                          file=sys.stderr, flush=True)
                    rows.append([model, net.name, f"{net.uplink_mbps:g}/{net.downlink_mbps:g}", f"{net.rtt_ms:g}",
                                 f"{res[split][0]:.1f} ({int(res[split][1])} B)", f"{edge_ms:.1f}", edge_est,
                                 f"{res[CLOUD_ONLY][0]:.1f} ({int(res[CLOUD_ONLY][1])} B)",
                                 res[CLOUD_ONLY][0] / res[split][0], edge_ms / res[split][0],
                                 "split" if best == split else best, bundle.best_cut_for(net.uplink_mbps),
                                 " / ".join("—" if res[c][2] is None else f"{res[c][2]:.3g}"
                                            for c in (split, CLOUD_ONLY))])
    print(f"bandwidth.py: {args.requests} sequential requests per cell, codec {args.codec}, cloud max_batch 1; "
          f"edge = this host; {host_line()}\n")
    print(table(["model", "network", "up/down Mbps", "RTT ms", "split ms (upload)", "edge-only ms",
                 "edge-only planner est. ms",
                 "cloud-only ms (upload)", "cloud-only / split", "edge-only / split", "fastest", "plan table says",
                 "agent est. Mbps (split / cloud-only)"],
                rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
