"""The local inference API's own cost per request: `LocalClient.infer` over the Unix socket of the service's API
against `EdgeAgent.infer` called in-process, on the same agent, inputs and cut; the shared stream (infer's
default) and a unary call per request (`unary=True`) side by side.

In one process: an EdgeAgent on the model's middle cut with no cloud (every request runs head + local tail on
this host: the API's cost does not depend on who serves), and the service's `LocalApi` over that agent on a Unix
socket in a temp dir (what `split-agent serve` runs). Each iteration times every run on the same input, in a
rotating order: in-process A and B, stream A and B, unary, the two no-op calls and the data work. Added ms =
median(API) - median(in-process), A and B pooled; "paired" is the median over iterations of (API - in-process)
of the same iteration. B - A of the same kind (two timings of the same thing in the same run) is the noise floor.
The no-op of each path is a request with no inputs, refused INVALID_ARGUMENT by the service's first check: the
round trip of that path with no tensor and no inference (its floor). Target: at most 0.3 ms added at the median.

    python -m benchmarks.local_api [--models mobilenet_v2,tiny] [--requests 300] [--bundles DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import bundles_dir, host_line, make_bundle, median, mid_cut, table
from edge_agent import EdgeAgent
from edge_agent.config import ServiceConfig
from edge_agent.local_api import LocalApi
from edge_agent.local_client import LocalClient, LocalError, request_bytes
from models.manifest import Bundle
from protos import codec
from protos import local_pb2 as lpb

TARGET_MS = 0.3
RUNS = ("direct_a", "stream_a", "unary", "direct_b", "stream_b", "noop_stream", "noop_unary", "data")
INFERENCES = ("direct_a", "direct_b", "stream_a", "stream_b", "unary")
# data: the request's and answer's bytes work without gRPC (build the request from the array as the client does,
# parse, check and decode it; encode, serialize, parse and decode a model-sized output)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def measure(bundle_path: Path, requests: int, warmup: int, sock_dir: Path) -> dict:
    """Samples (ms) of every run, interleaved; and the cut and input size."""
    bundle = Bundle.load(bundle_path)
    cut = mid_cut(bundle)
    spec = bundle.inputs[0]
    rng = np.random.default_rng(0)
    samples: dict[str, list[float]] = {k: [] for k in RUNS}
    agent = EdgeAgent.from_bundle(bundle_path, "127.0.0.1:1", cut=cut, connect=False, insecure=True,
                                  device_id="bench")
    agent.set_mode("local")  # no cloud: no reconnect attempts either
    api = LocalApi(agent, ServiceConfig(socket=str(sock_dir / "agent.sock"))).start()
    try:
        with LocalClient(socket=str(sock_dir / "agent.sock"), input_name=spec.name) as client:
            out_shape = agent.infer(rng.standard_normal(spec.concrete_shape(1)).astype(np.float32)).output.shape

            def data(x: np.ndarray) -> None:
                req = lpb.LocalInferRequest.FromString(request_bytes({spec.name: x}, "1", 30000))
                codec.decode_all(req.inputs, bundle.inputs)
                y = np.zeros(out_shape, np.float32)
                resp = lpb.LocalInferResponse.FromString(
                    lpb.LocalInferResponse(outputs=[codec.encode("y", y)]).SerializeToString())
                codec.decode_all(resp.outputs)

            def noop(unary: bool) -> None:
                try:
                    client.infer({}, timeout=30, unary=unary)
                except LocalError as exc:
                    if exc.code != "INVALID_ARGUMENT":
                        raise
                else:
                    raise RuntimeError("a request with no inputs was not refused")

            calls = {"direct": lambda x: agent.infer(x, timeout=30),
                     "stream": lambda x: client.infer(x, timeout=30),
                     "unary": lambda x: client.infer(x, timeout=30, unary=True),
                     "noop_stream": lambda x: noop(False), "noop_unary": lambda x: noop(True), "data": data}
            for i in range(warmup + requests):
                x = rng.standard_normal(spec.concrete_shape(1)).astype(np.float32)
                k = i % len(RUNS)
                for name in RUNS[k:] + RUNS[:k]:  # rotate who goes first
                    fn = calls[name] if name in calls else calls[name.rsplit("_", 1)[0]]
                    t0 = time.perf_counter()
                    res = fn(x)
                    took = _ms(t0)
                    if name in INFERENCES and res.cut != cut:
                        raise RuntimeError(f"{name}: ran on cut {res.cut}, expected {cut}")
                    if i >= warmup:
                        samples[name].append(took)
    finally:
        api.drain()
        api.stop(grace=1.0)
        agent.close()
    return {"cut": cut, "input_bytes": int(np.prod(spec.concrete_shape(1))) * 4, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table; 1 when a model misses the target on the stream (infer's default)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mobilenet_v2,tiny", help="comma-separated: tiny or zoo names")
    ap.add_argument("--requests", type=int, default=300, help="measured iterations per model")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--bundles", help="directory to build bundles in and reuse (default: a temp dir)")
    args = ap.parse_args(argv)
    rows = []
    missed = False
    with tempfile.TemporaryDirectory(prefix="splitinfer-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="sl-", dir="/tmp") as sock_dir:
        root = bundles_dir(args.bundles, tmp)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            path = make_bundle(model, root)
            r = measure(path, args.requests, args.warmup, Path(sock_dir))
            s = r["samples"]
            m = {k: median(v) for k, v in s.items()}
            direct = median(s["direct_a"] + s["direct_b"])
            stream = median(s["stream_a"] + s["stream_b"])
            added_stream, added_unary = stream - direct, m["unary"] - direct
            paired = median([(a + b - c - d) / 2 for a, b, c, d in
                             zip(s["stream_a"], s["stream_b"], s["direct_a"], s["direct_b"])])
            ok = added_stream <= TARGET_MS
            missed |= not ok
            rows.append([model, r["cut"], r["input_bytes"], direct, m["direct_b"] - m["direct_a"], stream,
                         added_stream, paired, m["stream_b"] - m["stream_a"], m["unary"], added_unary,
                         m["noop_stream"], m["noop_unary"], m["data"], "PASS" if ok else "MISS"])
            print(f"# {model}: in-process {direct:.3f} ms, stream {stream:.3f} ms (added {added_stream:.3f}), "
                  f"unary {m['unary']:.3f} ms (added {added_unary:.3f})", file=sys.stderr, flush=True)
    print(f"local_api.py: {args.requests} iterations per model (x{len(RUNS)} calls, rotating order); "
          f"{host_line()}\n")
    print(table(["model", "cut", "input B", "in-process ms", "noise: B - A", "stream ms", "added ms",
                 "added, paired", "stream B - A", "unary ms", "unary added", "no-op stream", "no-op unary",
                 "data work", f"stream <= {TARGET_MS} ms"], rows))
    print("\nMedians in ms of one request to completion (head + local tail on this host). stream = LocalClient.infer "
          "(the shared stream), unary = infer(unary=True); added = API - in-process (A and B pooled); paired = "
          "median of the per-iteration differences; B - A of the same call is the noise floor; no-op = a request "
          "with no inputs, refused by the service's first check (the round trip of that path alone); data work = "
          "building, parsing, checking and decoding the input and an output of the model's size, without gRPC.")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
