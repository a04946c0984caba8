"""The framework's own cost: end-to-end latency through agent + cloud on loopback minus the sum of its parts.

For each model, one EdgeAgent talks to `split-cloud serve` (a separate process, as deployed) on 127.0.0.1.
Each iteration runs one request end to end (`agent.infer`, timed by the caller), then, in the same process
and on the same input, the parts on their own: the head (the agent's runtime), encoding the cut tensors,
decoding them, the tail (an onnxruntime session with the cloud's settings), and encoding + decoding the
outputs. Overhead = median(e2e) - sum of the parts' medians (medians per stage, so one request slowed by
background load does not move the result). What overhead holds: threads
handing work over, gRPC on both ends, loopback TCP, the batcher, request building and bookkeeping.

Target: overhead <= max(1 ms, 5% of the median e2e). Batching off (max_batch 1) is the latency
configuration; batching on (max_batch 16, continuous: a free worker takes whatever is queued) should cost a
lone request nothing extra, and this row checks that. Both rows run mTLS, as deployed (a CA made for the run).

The TLS table: what mTLS costs per request. Four agents, in the same run and on the same inputs, with batching
off, each to its own `split-cloud serve` process: two over mTLS (A, B), two in plaintext to `--insecure` servers
(A, B); each iteration sends one request through each, in a rotating order, so drift and background load fall on
all four alike. mTLS / plaintext is the ratio of the medians (the A and B samples pooled); B / A of the same kind
(two timings of the same thing, server processes included) is the noise floor. Target: mTLS adds at most 10% at
the median.

    python -m benchmarks.overhead [--models tiny,mobilenet_v2] [--requests 200] [--codec int8] [--bundles DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import bench_pki, bundles_dir, host_line, make_bundle, median, mid_cut, table
from cloud_tier.lab.process import CloudProcess
from edge_agent import EdgeAgent
from edge_agent.config import TlsConfig
from edge_agent.runtime import CutRuntime, OrtRunner, RunnerCache, RuntimeOptions, prepare_inputs
from models.manifest import Bundle
from protos import codec

CONFIGS = (("off (max_batch 1)", ["--max-batch", "1"]), ("on (max_batch 16)", ["--max-batch", "16"]))
TLS_RUNS = ("mtls_a", "plain_a", "mtls_b", "plain_b")  # each an agent with its own server process


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def measure(bundle_path: Path, root: Path, codec_spec: str, requests: int, warmup: int, server_args: list[str],
            pki: Path, tls: TlsConfig) -> dict:
    """Interleave e2e requests and part timings for one server configuration; per-stage samples in ms."""
    bundle = Bundle.load(bundle_path)
    cut = mid_cut(bundle)
    rt = CutRuntime(bundle, cut, "int8", RunnerCache(RuntimeOptions(1, 1)))  # what the agent runs
    tail = OrtRunner(bundle.cut(cut).tail, RuntimeOptions(1, 1))  # the cloud's default: 1 intra-op thread
    spec = bundle.inputs[0]
    rng = np.random.default_rng(0)
    samples: dict[str, list[float]] = {k: [] for k in
                                       ("e2e", "head", "encode", "decode", "tail", "outputs",
                                        "agent_queue", "network", "cloud_queue", "cloud_tail")}
    wire = 0
    with CloudProcess(root, *server_args, "--cpu-only", "--log-level", "WARNING", pki=pki) as cloud:
        agent = EdgeAgent.from_bundle(bundle_path, cloud=cloud.address, cut=cut, codec=codec_spec, deadline_ms=10_000,
                                      device_id="bench", tls=tls)
        try:
            if not agent.wait_for_mode("split", 30):
                raise RuntimeError(f"the agent did not reach the cloud: {agent.stats().extra}")
            for i in range(warmup + requests):
                x = rng.standard_normal(spec.concrete_shape(1)).astype(np.float32)
                t0 = time.perf_counter()
                res = agent.infer(x, timeout=30)
                e2e = _ms(t0)
                if res.served_by != "cloud":
                    raise RuntimeError(f"request served by {res.served_by}: {res.fallback_reason}")
                t0 = time.perf_counter()
                act = rt.run_head(prepare_inputs(x, rt.inputs))
                head = _ms(t0)
                t0 = time.perf_counter()
                tensors = codec.encode_all(act, codec_spec)
                enc = _ms(t0)
                t0 = time.perf_counter()
                feeds = codec.decode_all(tensors)
                dec = _ms(t0)
                t0 = time.perf_counter()
                outs = tail.run(feeds)
                tl = _ms(t0)
                t0 = time.perf_counter()
                codec.decode_all(codec.encode_all(outs, "fp32"))
                out_ms = _ms(t0)
                if i < warmup:
                    continue
                wire = codec.wire_bytes(tensors)
                for k, v in (("e2e", e2e), ("head", head), ("encode", enc), ("decode", dec), ("tail", tl),
                             ("outputs", out_ms),
                             ("agent_queue", res.timing.queue_ms), ("network", res.timing.network_ms),
                             ("cloud_queue", res.timing.cloud_queue_ms), ("cloud_tail", res.timing.tail_ms)):
                    samples[k].append(v)
        finally:
            agent.close()
    return {"cut": cut, "wire": wire, "samples": samples}


def measure_tls(bundle_path: Path, root: Path, codec_spec: str, requests: int, warmup: int, pki: Path,
                tls: TlsConfig) -> dict:
    """e2e samples (ms) of one request at a time through four agents, each to its own server, batching off: two
    over mTLS and two in plaintext, one request each per iteration in rotating order."""
    bundle = Bundle.load(bundle_path)
    cut = mid_cut(bundle)
    spec = bundle.inputs[0]
    rng = np.random.default_rng(1)
    names = TLS_RUNS
    samples: dict[str, list[float]] = {k: [] for k in names}
    args = ("--max-batch", "1", "--no-fleet", "--cpu-only", "--log-level", "WARNING")
    fields = {"cut": cut, "codec": codec_spec, "deadline_ms": 10_000, "device_id": "bench"}
    with contextlib.ExitStack() as stack:
        agents = {}
        for name in names:
            secure = name.startswith("mtls")
            cloud = stack.enter_context(CloudProcess(root, *args, pki=pki) if secure
                                        else CloudProcess(root, *args, insecure=True))
            agents[name] = EdgeAgent.from_bundle(bundle_path, cloud.address, **fields,
                                                 **({"tls": tls} if secure else {"insecure": True}))
            stack.callback(agents[name].close)
        for name, agent in agents.items():
            if not agent.wait_for_mode("split", 30):
                raise RuntimeError(f"agent {name} did not reach the cloud: {agent.stats().extra}")
        for i in range(warmup + requests):
            x = rng.standard_normal(spec.concrete_shape(1)).astype(np.float32)
            k = i % len(names)
            for name in names[k:] + names[:k]:  # rotate who goes first
                t0 = time.perf_counter()
                res = agents[name].infer(x, timeout=30)
                e2e = _ms(t0)
                if res.served_by != "cloud":
                    raise RuntimeError(f"{name}: request served by {res.served_by}: {res.fallback_reason}")
                if i >= warmup:
                    samples[name].append(e2e)
    return {"cut": cut, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    """Run the overhead benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,mobilenet_v2", help="comma-separated: tiny or zoo names")
    ap.add_argument("--requests", type=int, default=200, help="measured requests per configuration")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--codec", default="int8", help="activation codec (default %(default)s)")
    ap.add_argument("--bundles", help="directory to build bundles in and reuse (default: a temp dir)")
    args = ap.parse_args(argv)
    rows = []
    tls_rows = []
    missed = False
    with tempfile.TemporaryDirectory(prefix="splitinfer-overhead-") as tmp:
        root = bundles_dir(args.bundles, tmp)
        pki, tls = bench_pki(Path(tmp))
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            path = make_bundle(model, root)
            t = measure_tls(path, root, args.codec, args.requests, args.warmup, pki, tls)
            m = {k: median(v) for k, v in t["samples"].items()}
            mtls = median(t["samples"]["mtls_a"] + t["samples"]["mtls_b"])
            plain = median(t["samples"]["plain_a"] + t["samples"]["plain_b"])
            ratio = mtls / plain
            noise = (m["plain_b"] / m["plain_a"], m["mtls_b"] / m["mtls_a"])
            tls_rows.append([model, t["cut"], mtls, plain, f"{ratio:.3f}", m["mtls_a"], m["mtls_b"], m["plain_a"],
                             m["plain_b"], f"{noise[0]:.3f}", f"{noise[1]:.3f}", "PASS" if ratio <= 1.10 else "MISS"])
            print(f"# {model} mTLS {mtls:.2f} ms vs plaintext {plain:.2f} ms: x{ratio:.3f} (same thing twice: "
                  f"plain x{noise[0]:.3f}, mTLS x{noise[1]:.3f})", file=sys.stderr, flush=True)
            for label, server_args in CONFIGS:
                r = measure(path, root, args.codec, args.requests, args.warmup, server_args, pki, tls)
                s = {k: median(v) for k, v in r["samples"].items()}
                s["parts"] = sum(s[k] for k in ("head", "encode", "decode", "tail", "outputs"))
                s["overhead"] = s["e2e"] - s["parts"]
                target = max(1.0, 0.05 * s["e2e"])
                ok = s["overhead"] <= target
                missed |= not ok and label.startswith("off")
                rows.append([model, r["cut"], r["wire"], label, s["e2e"], s["head"], s["encode"], s["decode"],
                             s["tail"], s["outputs"], s["parts"], s["overhead"], 100 * s["overhead"] / s["e2e"],
                             target, "PASS" if ok else "MISS", s["agent_queue"], s["network"], s["cloud_queue"],
                             s["cloud_tail"]])
                print(f"# {model} batching {label}: e2e {s['e2e']:.2f} ms, overhead {s['overhead']:.2f} ms",
                      file=sys.stderr, flush=True)
    print(f"overhead.py: {args.requests} requests per row, codec {args.codec}; {host_line()}\n")
    print(table(["model", "cut", "wire B", "batching", "e2e ms", "head", "encode", "decode", "tail",
                 "outputs enc+dec", "parts sum", "overhead ms", "overhead %", "target ms", "result",
                 "agent queue", "network", "cloud queue", "cloud tail"], rows))
    print("\nAll times are medians in ms; overhead = e2e - parts sum (the sum of the stage medians). Target: "
          "max(1 ms, 5% of e2e). The last four columns are the agent's own timing of where the overhead sits: "
          "submit -> edge worker, the round trip minus the cloud's reported time (gRPC both ways, loopback, "
          "servicer), the wait in the cloud's batcher, and the tail run time the cloud reports.")
    print("\nmTLS vs plaintext, batching off, e2e medians in ms, interleaved in the same run (see the docstring):\n")
    print(table(["model", "cut", "mTLS", "plaintext", "mTLS / plaintext", "mTLS A", "mTLS B", "plain A",
                 "plain B", "noise: plain B / A", "noise: mTLS B / A", "<= 1.10"], tls_rows))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
