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

`--ray` compares where the tails run instead, in the same interleaved way, on one local Ray cluster (loopback,
started here): `local` (the in-process batcher, max_batch 16), `ray` (`split-cloud serve --backend ray` in its
own process joined to that cluster: our gRPC front, the tails as Serve deployments with @serve.batch) and
`serve` (a plain Serve `@serve.batch` deployment of the same tail, with the same deployment options, called
from here through its DeploymentHandle by as many closed-loop threads as agents: no front, no gRPC, no codec).
Both Serve deployments have `--replicas` replicas (fixed), the in-process node as many tail workers. `local`
is timed twice per round (`local'`): the two are the noise floor. Reported: ray/serve throughput (target
>= 0.85: our front costs little) and ray/local (target >= 0.75 on one machine) per agent count.
`--providers cuda` runs the tails with the CUDA provider (the in-process node, and replicas given a share of
a GPU where the cluster has GPUs); with prebuilt bundles (`--bundles DIR` holding them) it needs only numpy,
onnxruntime-gpu, grpcio and ray[serve] at run time, not torch.

    python -m benchmarks.batching [--models tiny,mobilenet_v2] [--agents 1,4,16] [--seconds 3] [--rounds 2]
                                  [--bundles DIR] [--ray [--replicas 2] [--providers cpu|cuda]]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
MAX_BATCH = 16
PLAIN_APP = "bench-plain-serve-tail"
DEPLOY_TIMEOUT_S = 300.0
CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
Load = Callable[[int, float, float], dict]  # (agents, seconds, warmup_s) -> {"rps", "p50", "p95", "batch", "n"}


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


def closed_loops(agents: int, seconds: float, warmup_s: float,
                 loop: Callable[[int, threading.Barrier, list[float], list], None]) -> dict:
    """Run `agents` closed loops (`loop(i, ready, window, out)` appends (t_done, ms, batch) while measuring) and
    summarize the measuring window: throughput, p50/p95 latency, mean batch size."""
    window: list[float] = []
    ready = threading.Barrier(agents + 1, action=lambda: window.extend(
        [time.perf_counter() + warmup_s, time.perf_counter() + warmup_s + seconds]))
    results: list[list] = [[] for _ in range(agents)]
    threads = [threading.Thread(target=loop, daemon=True, args=(i, ready, window, results[i]))
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


def run_load(address: str, template: pb.InferRequest, agents: int, seconds: float, warmup_s: float) -> dict:
    """Run `agents` closed-loop gRPC streams against `address`; throughput and latency of the measuring window."""
    return closed_loops(agents, seconds, warmup_s, lambda i, ready, window, out: _agent(
        address, template, f"bench-{i}", ready, window, out))


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


def measure_model(model: str, root: Path, loads: dict[str, Callable[[Bundle, str, Any], Load]], counts: list[int],
                  args, noise: str | None = None) -> dict:
    """Alternate the configurations' rounds for every agent count on one model; per-config lists of results.
    `noise` names a configuration timed twice per round (as `noise'`): the noise floor."""
    path = make_bundle(model, root)
    bundle = Bundle.load(path)
    cut = mid_cut(bundle)
    rt = CutRuntime(bundle, cut, "int8", RunnerCache(RuntimeOptions(1, 1)))
    x = np.random.default_rng(0).standard_normal(bundle.inputs[0].concrete_shape(1)).astype(np.float32)
    act = rt.run_head({bundle.inputs[0].name: x})
    template = pb.InferRequest(model=bundle.model_name, cut=cut, tensors=codec.encode_all(act, args.codec),
                               deadline_ms=60_000)
    tail = OrtRunner(Path(str(bundle.cut(cut).tail)), RuntimeOptions(1, 1))
    per_row = {b: tail_ms_per_row(tail, act, b) for b in (1, 4, 16)}
    # what a plain Serve client sends: the activation as the cloud decodes it from the codec
    decoded = {t.name: codec.decode(t) for t in template.tensors}
    runners = {label: make(bundle, cut, (template, decoded)) for label, make in loads.items()}
    order = list(runners) + ([f"{noise}'"] if noise else [])
    runs: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for n in counts:
            for label in (order if rnd % 2 == 0 else order[::-1]):
                r = runners[label.rstrip("'")](n, args.seconds, args.warmup)
                runs.setdefault((label, n), []).append(r)
                print(f"# {model} round {rnd + 1}, {n} agents, {label}: {r['rps']:.1f} req/s, "
                      f"batch {r['batch']:.2f}", file=sys.stderr, flush=True)
    return {"cut": cut, "wire": codec.wire_bytes(template.tensors), "per_row": per_row, "runs": runs}


def grpc_load(address: str) -> Callable[[Bundle, str, Any], Load]:
    """Closed-loop gRPC streams to the node at `address` (the request made once per model)."""
    return lambda bundle, cut, req: (lambda n, sec, warm: run_load(address, req[0], n, sec, warm))


# -- --ray: plain Ray Serve, without our front ---------------------------------------------------------------------


def _serve_batch(fn: Any) -> Any:
    """@serve.batch (max_batch_size MAX_BATCH, no wait, as `--max-batch 16`); `fn` itself without Ray."""
    try:
        from ray import serve
    except ImportError:
        return fn
    return serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.0)(fn)


class PlainServeTail:
    """The same tail as a plain Serve deployment: one onnxruntime session behind @serve.batch (rows = requests
    here: each carries one row), what a Serve user would write without our front. Answers (outputs, batch rows)."""

    def __init__(self, model: bytes, providers: list[str], max_batch: int, wait_s: float = 0.0):
        import onnxruntime as ort
        import ray

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        usable = [p for p in providers if p in ort.get_available_providers()
                  and (ray.get_gpu_ids() or p == "CPUExecutionProvider")]
        self.session = ort.InferenceSession(model, opts, providers=usable or ["CPUExecutionProvider"])
        self.run_batch.set_max_batch_size(max_batch)  # type: ignore[attr-defined]
        self.run_batch.set_batch_wait_timeout_s(wait_s)  # type: ignore[attr-defined]

    async def __call__(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        return await self.run_batch(feeds)  # type: ignore[arg-type,no-any-return]

    @_serve_batch
    async def run_batch(self, items: list[dict[str, np.ndarray]]) -> list[tuple[dict[str, np.ndarray], int]]:
        """One session run over the batch (in a thread, as the Ray backend's replica does)."""
        import asyncio

        def run() -> list[tuple[dict[str, np.ndarray], int]]:
            feeds = {k: np.concatenate([i[k] for i in items]) for k in items[0]}
            names = [o.name for o in self.session.get_outputs()]
            outs = self.session.run(names, feeds)
            return [({n: o[j: j + 1] for n, o in zip(names, outs)}, len(items)) for j in range(len(items))]

        return await asyncio.to_thread(run)


def serve_load(handle: Any) -> Callable[[Bundle, str, Any], Load]:
    """Closed loops of DeploymentHandle calls (one thread per agent), each sending the decoded activation."""

    def make(_bundle: Bundle, _cut: str, req: Any) -> Load:
        feeds = req[1]

        def loop(_i: int, ready: threading.Barrier, window: list[float], out: list) -> None:
            handle.remote(feeds).result(timeout_s=CALL_TIMEOUT_S)  # connected, like a stream that is open
            ready.wait(60)
            measure_from, stop_at = window
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                _, batch = handle.remote(feeds).result(timeout_s=CALL_TIMEOUT_S)
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    out.append((t1, (t1 - t0) * 1000.0, batch))

        return lambda n, sec, warm: closed_loops(n, sec, warm, loop)

    return make


def start_ray(providers: str) -> tuple[Any, Any, str, float]:
    """A local Ray cluster on loopback with Serve (proxies off); (ray, serve, its GCS address, GPUs)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; the node's process joins with it too
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from cloud_tier.ray_backend import require_ray

    ray, serve = require_ray()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    gpus = float(ray.cluster_resources().get("GPU", 0.0)) if providers == "cuda" else 0.0
    return ray, serve, ray.get_runtime_context().gcs_address, gpus


def ray_configs(stack: contextlib.ExitStack, root: Path, models: list[str], args) -> dict[str, Callable]:
    """The --ray configurations: local (in-process), ray (our front + Serve), serve (plain Serve), on one cluster."""
    from cloud_tier.config import RayOptions
    from cloud_tier.ray_backend import deployment_options

    ray, serve, gcs, gpus = start_ray(args.providers)
    stack.callback(ray.shutdown)
    stack.callback(serve.shutdown)
    n = args.replicas
    # Every replica must fit at once: the node's tails (each cut of each bundle) and one plain deployment, each n
    # times, in the cluster's CPUs (and GPUs); the reservations are bookkeeping, the replicas share the cores.
    # (the node serves every bundle in the folder, not only --models)
    replicas = n * (sum(len(Bundle.load(d).cut_ids) for d in root.iterdir() if (d / "plan.json").is_file()) + 1)
    cpus = min(0.5, ray.cluster_resources().get("CPU", 2.0) / replicas)
    per_gpu = gpus / replicas if gpus else 0.0
    opts = RayOptions(min_replicas=n, max_replicas=n, num_cpus=cpus, num_gpus=per_gpu)
    cuda = args.providers == "cuda"
    device = ["--providers", ",".join(CUDA_PROVIDERS)] if cuda else ["--cpu-only"]
    batching = ["--max-batch", str(MAX_BATCH), "--max-wait-ms", f"{args.max_wait_ms:g}", "--log-level", "WARNING",
                "--no-fleet"]
    local = stack.enter_context(CloudProcess(root, *batching, "--workers", str(n), *device, insecure=True)).address
    front = stack.enter_context(CloudProcess(
        root, *batching, *device, "--backend", "ray", "--ray-address", gcs, "--min-replicas", str(n),
        "--max-replicas", str(n), "--replica-cpus", f"{cpus:g}", "--replica-gpus", f"{per_gpu:g}",
        insecure=True, start_timeout=DEPLOY_TIMEOUT_S)).address
    providers = CUDA_PROVIDERS if cuda else ["CPUExecutionProvider"]

    def plain(bundle: Bundle, cut: str, req: Any) -> Load:
        name = f"{PLAIN_APP}-{bundle.model_name}"
        app = serve.deployment(PlainServeTail).options(name=name, **deployment_options(opts, MAX_BATCH, 256)).bind(
            Path(str(bundle.cut(cut).tail)).read_bytes(), providers, MAX_BATCH, args.max_wait_ms / 1000.0)
        with ThreadPoolExecutor(1) as pool:  # serve.run has no deadline of its own (unschedulable replicas)
            handle = pool.submit(serve.run, app, name=name, route_prefix=None).result(timeout=DEPLOY_TIMEOUT_S)
        return serve_load(handle)(bundle, cut, req)

    return {"local": grpc_load(local), "ray": grpc_load(front), "serve": plain}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report_ray(results: dict, counts: list[int], args) -> int:
    """The --ray table and its verdicts (ray/serve >= 0.85, ray/local >= 0.75 at each agent count)."""
    rows, verdicts = [], []
    for model, res in results.items():
        med = {key: {k: median([r[k] for r in rs]) for k in ("rps", "p50", "p95", "batch", "n")}
               for key, rs in res["runs"].items()}
        for n in counts:
            for label in ("local", "local'", "ray", "serve"):
                r = med[(label, n)]
                rows.append([model, f"{res['cut']} ({res['wire']} B)", n, label, r["rps"], r["p50"], r["p95"],
                             r["batch"]])
            vs_serve = _ratio(med[("ray", n)]["rps"], med[("serve", n)]["rps"])
            vs_local = _ratio(med[("ray", n)]["rps"], med[("local", n)]["rps"])
            noise = _ratio(med[("local'", n)]["rps"], med[("local", n)]["rps"])
            verdicts.append(f"- {model}, {n} agents: ray/serve {vs_serve:.2f} (target >= 0.85: "
                            f"{'PASS' if vs_serve >= 0.85 else 'MISS'}), ray/local {vs_local:.2f} (target >= 0.75: "
                            f"{'PASS' if vs_local >= 0.75 else 'MISS'}); noise floor local'/local {noise:.2f}")
    print(table(["model", "cut (request)", "agents", "tails", "req/s", "p50 ms", "p95 ms", "mean batch"], rows))
    print("\n" + "\n".join(verdicts))
    return 0 if all(v.count("PASS") == 2 for v in verdicts) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the batching benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,mobilenet_v2", help="comma-separated: tiny or zoo names")
    ap.add_argument("--agents", default="1,4,16", help="concurrent agents, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring window per row and round")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds before the window")
    ap.add_argument("--rounds", type=int, default=2, help="on/off alternations; the table shows medians")
    ap.add_argument("--codec", default="int8", help="activation codec (default %(default)s)")
    ap.add_argument("--bundles", help="directory to build bundles in and reuse; bundles already there are used as "
                                      "they are (no torch needed then) (default: a temp dir)")
    ap.add_argument("--ray", action="store_true", help="compare in-process, Ray backend and plain Ray Serve instead")
    ap.add_argument("--replicas", type=int, default=2, help="--ray: replicas per deployment, tail workers in-process")
    ap.add_argument("--max-wait-ms", type=float, default=0.0,
                    help="--ray: the batch window of all three (--max-wait-ms, batch_wait_timeout_s) (default 0)")
    ap.add_argument("--providers", choices=("cpu", "cuda"), default="cpu",
                    help="--ray: where the tails run (cuda: the CUDA provider; GPUs shared by the replicas)")
    args = ap.parse_args(argv)
    counts = [int(a) for a in args.agents.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="splitinfer-batching-") as tmp:
        root = bundles_dir(args.bundles, tmp)
        for model in models:
            make_bundle(model, root)
        with contextlib.ExitStack() as stack:
            if args.ray:
                loads = ray_configs(stack, root, models, args)
            else:  # plaintext on loopback: the simulated agents are raw gRPC threads measuring the batcher, not TLS
                loads = {label: grpc_load(stack.enter_context(CloudProcess(
                    root, *flags, "--cpu-only", "--log-level", "WARNING", insecure=True)).address)
                    for label, flags in CONFIGS.items()}
            for model in models:
                results[model] = measure_model(model, root, loads, counts, args, noise="local" if args.ray else None)
    if args.ray:
        print(f"batching.py --ray: {args.rounds} alternating rounds of {args.seconds:g} s per row (medians over "
              f"rounds), codec {args.codec}, max_batch {MAX_BATCH}, window {args.max_wait_ms:g} ms, {args.replicas} "
              f"replicas / tail workers x 1 thread, providers {args.providers}; {host_line()}\n")
        return report_ray(results, counts, args)
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
