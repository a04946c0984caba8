"""Cloud throughput with dynamic batching on vs off, at 1, 4 and 16 concurrent agents.

The cloud is `split-cloud serve` in its own process (2 tail workers, 1 onnxruntime thread each, CPU). Each
simulated agent is a thread with its own channel and one long-lived Infer stream, sending the same
pre-encoded cut tensors in a closed loop (next request when the last reply is back), so the client side costs
almost nothing and the cloud is what is measured. Batching on: max_batch 16 with the default continuous
batching (a free worker takes whatever queued); window: max_batch 16 and max_wait 2 ms (the first request of a
batch waits for company even while a worker idles); off: max_batch 1. All servers run for the whole benchmark
and the configurations take turns in each round, in an order that alternates (`--rounds`), so background
load hits them alike. Reported per row: the median over rounds of requests/s in the measuring window, median
and p95 latency, mean batch size seen in the replies; and the on/off throughput ratio per agent count
(target >= 1.5x at 16 agents on this CPU).
It also times the tail alone at batch 1, 4 and 16 (1 thread): on a CPU the tail's cost per row barely drops
with the batch, which bounds what batching can win; on a GPU it drops by an order of magnitude.

    python -m benchmarks.batching [--models tiny,mobilenet_v2] [--agents 1,4,16] [--seconds 3] [--rounds 2]
                                  [--bundles DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks._common import bundles_dir, host_line, make_bundle, median, mid_cut, percentile, table
from cloud_tier.lab.process import CloudProcess
from edge_agent.runtime import CutRuntime, OrtRunner, RunnerCache, RuntimeOptions
from models.manifest import Bundle
from protos import codec
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

CONFIGS = {"on": ["--max-batch", "16"], "window": ["--max-batch", "16", "--max-wait-ms", "2"],
           "off": ["--max-batch", "1"]}
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
CALL_TIMEOUT_S = 120.0


def _agent(address: str, template: pb.InferRequest, name: str, ready: threading.Barrier, window: list[float],
           out: list) -> None:
    """One closed-loop stream: send, wait for the reply, repeat until the window ends; append (t_done, ms, batch)."""
    q: queue.Queue[pb.InferRequest | None] = queue.Queue(maxsize=1)

    def requests():
        while (item := q.get()) is not None:
            yield item

    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        replies = pb_grpc.SplitInferenceStub(channel).Infer(requests(), timeout=CALL_TIMEOUT_S)
        req = pb.InferRequest()
        req.CopyFrom(template)
        req.device_id = name
        ready.wait(60)  # every agent connected; the main thread has set the window
        measure_from, stop_at = window
        i = 0
        try:
            while time.perf_counter() < stop_at:
                i += 1
                req.request_id = f"{name}-{i}"  # safe to reuse: the last one was sent before its reply came
                t0 = time.perf_counter()
                q.put(req)
                reply = next(replies)
                t1 = time.perf_counter()
                if reply.status.code != 0:
                    raise RuntimeError(f"{name}: cloud answered {reply.status.code}: {reply.status.message}")
                if t0 >= measure_from:
                    out.append((t1, (t1 - t0) * 1000.0, reply.timing.batch_size))
        finally:
            q.put(None)
            replies.cancel()


def run_load(address: str, template: pb.InferRequest, agents: int, seconds: float, warmup_s: float) -> dict:
    """Run `agents` closed loops against `address`; throughput and latency of the measuring window."""
    window: list[float] = []
    ready = threading.Barrier(agents + 1, action=lambda: window.extend(
        [time.perf_counter() + warmup_s, time.perf_counter() + warmup_s + seconds]))
    results: list[list] = [[] for _ in range(agents)]
    threads = [threading.Thread(target=_agent, daemon=True,
                                args=(address, template, f"bench-{i}", ready, window, results[i]))
               for i in range(agents)]
    for t in threads:
        t.start()
    ready.wait(60)
    for t in threads:
        t.join(seconds + warmup_s + CALL_TIMEOUT_S)
    done = [r for rs in results for r in rs if r[0] <= window[1]]
    lat = [r[1] for r in done]
    return {"rps": len(done) / seconds, "p50": median(lat), "p95": percentile(lat, 95),
            "batch": float(np.mean([r[2] for r in done])) if done else float("nan"), "n": len(done)}


def tail_ms_per_row(runner: OrtRunner, act: dict[str, np.ndarray], batch: int, repeats: int = 10) -> float:
    """Median tail time per row at `batch` rows (the activation repeated)."""
    feeds = {k: np.repeat(v, batch, axis=0) for k, v in act.items()}
    for _ in range(3):
        runner.run(feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.run(feeds)
        times.append((time.perf_counter() - t0) * 1000.0 / batch)
    return median(times)


def measure_model(model: str, root: Path, addresses: dict[str, str], counts: list[int], args) -> dict:
    """Alternate on/off rounds for every agent count on one model; per-config lists of results."""
    path = make_bundle(model, root)
    bundle = Bundle.load(path)
    cut = mid_cut(bundle)
    rt = CutRuntime(bundle, cut, "int8", RunnerCache(RuntimeOptions(1, 1)))
    x = np.random.default_rng(0).standard_normal(bundle.inputs[0].concrete_shape(1)).astype(np.float32)
    act = rt.run_head({bundle.inputs[0].name: x})
    template = pb.InferRequest(model=bundle.model_name, cut=cut, tensors=codec.encode_all(act, args.codec),
                               deadline_ms=60_000)
    tail = OrtRunner(bundle.cut(cut).tail, RuntimeOptions(1, 1))
    per_row = {b: tail_ms_per_row(tail, act, b) for b in (1, 4, 16)}
    runs: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for n in counts:
            labels = list(addresses)
            for label in (labels if rnd % 2 == 0 else labels[::-1]):
                r = run_load(addresses[label], template, n, args.seconds, args.warmup)
                runs.setdefault((label, n), []).append(r)
                print(f"# {model} round {rnd + 1}, {n} agents, batching {label}: {r['rps']:.1f} req/s, "
                      f"batch {r['batch']:.2f}", file=sys.stderr, flush=True)
    return {"cut": cut, "wire": codec.wire_bytes(template.tensors), "per_row": per_row, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    """Run the batching benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,mobilenet_v2", help="comma-separated: tiny or zoo names")
    ap.add_argument("--agents", default="1,4,16", help="concurrent agents, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring window per row and round")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds before the window")
    ap.add_argument("--rounds", type=int, default=2, help="on/off alternations; the table shows medians")
    ap.add_argument("--codec", default="int8", help="activation codec (default %(default)s)")
    ap.add_argument("--bundles", help="directory to build bundles in and reuse (default: a temp dir)")
    args = ap.parse_args(argv)
    counts = [int(a) for a in args.agents.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="splitinfer-batching-") as tmp:
        root = bundles_dir(args.bundles, tmp)
        for model in models:
            make_bundle(model, root)
        with contextlib.ExitStack() as stack:
            # plaintext on loopback: the simulated agents are raw gRPC threads measuring the batcher, not TLS
            addresses = {label: stack.enter_context(CloudProcess(root, *flags, "--cpu-only", "--log-level",
                                                                 "WARNING", insecure=True)).address
                         for label, flags in CONFIGS.items()}
            for model in models:
                results[model] = measure_model(model, root, addresses, counts, args)
    print(f"batching.py: {args.rounds} alternating rounds of {args.seconds:g} s per row (medians over rounds), "
          f"codec {args.codec}, 2 tail workers x 1 thread; {host_line()}\n")
    rows, verdicts = [], []
    for model, res in results.items():
        med = {key: {k: median([r[k] for r in rs]) for k in ("rps", "p50", "p95", "batch", "n")}
               for key, rs in res["runs"].items()}
        for n in counts:
            for label in CONFIGS:
                r = med[(label, n)]
                vs_off = r["rps"] / med[("off", n)]["rps"] if med[("off", n)]["rps"] else float("nan")
                rows.append([model, f"{res['cut']} ({res['wire']} B)", n, label, r["rps"], r["p50"], r["p95"],
                             r["batch"], f"{vs_off:.2f}x" if label != "off" else ""])
        ratio16 = med[("on", counts[-1])]["rps"] / max(1e-9, med[("off", counts[-1])]["rps"])
        pr = res["per_row"]
        verdicts.append(f"- {model}: on/off at {counts[-1]} agents {ratio16:.2f}x (target >= 1.5x): "
                        f"{'PASS' if ratio16 >= 1.5 else 'MISS'}; tail alone, 1 thread, ms per row at batch "
                        f"1/4/16: {pr[1]:.3f}/{pr[4]:.3f}/{pr[16]:.3f} (compute-only gain {pr[1] / pr[16]:.2f}x)")
    print(table(["model", "cut (request)", "agents", "batching", "req/s", "p50 ms", "p95 ms", "mean batch",
                 "vs off"], rows))
    print("\n" + "\n".join(verdicts))
    return 0 if all("PASS" in v for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
