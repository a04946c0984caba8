"""How long the cut search takes, and how much memory it holds, against the size of the graph.

The cut search is `partitioning.planner.plan_cuts`: every topological prefix, the exact min-cuts per objective
and link, each candidate simulated, the best chosen and the plan table (11 uplink rates) built. Measured on
the zoo's models (graphs from their ONNX export, costs estimated for rpi4 and t4, as `split-profile --device
rpi4 --cloud t4` plans them) and on synthetic graphs of 250 to 5,000 nodes shaped like real nets (a chain of
blocks: residual blocks with skip connections, branches joined by a Concat, downsampling, elementwise tails).
Prints the median wall time over --repeats runs, the peak Python memory of one run (tracemalloc), and the
growth order: the slope of log(time) and log(memory) against log(nodes) over the synthetic sizes.

    python -m benchmarks.planning_time [--sizes 250,500,1000,2000,5000] [--repeats 3] [--no-zoo]

Growth orders (2026-11-29, synthetic graphs of 250-5,000 nodes, 2 shared cores): time ~ n^1.4-1.5 (the
per-candidate sums that must add in the reference's order: edge costs over the prefix's node set, cloud costs
over the rest), peak memory ~ n^1.0 (46.9 MB at 5,000 nodes; it was n^1.7 and 583 MB while every prefix
candidate held a frozenset of its nodes, before partitioning.planner.TopoPrefix).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from partitioning.graph import CutGraph, TensorInfo
from partitioning.planner import BoundaryRates, CostInputs, Link, plan_cuts

ZOO = ("tiny_cnn", "resnet18", "mobilenet_v2", "vgg11", "vit_tiny", "unet_small")
DEFAULT_SIZES = (250, 500, 1000, 2000, 5000)
LINK = Link(uplink_mbps=10.0, downlink_mbps=20.0, rtt_ms=40.0, tx_nj_per_byte=100.0)  # "4g"-like


def synthetic_graph(nodes: int, seed: int = 0) -> tuple[CutGraph, CostInputs]:
    """A CNN-like graph of about `nodes` nodes, with edge and cloud costs that make middle cuts worth having.

    Blocks, drawn at random: a residual block (Conv, Relu, Conv, Add with the block's input, Relu), a
    branch block (2-4 Conv branches joined by a Concat), a downsampling (MaxPool, Conv: half the spatial
    size, twice the channels), or one elementwise or view op; then global pooling and a Gemm. Relus cost 0
    on both sides (fused into their Conv), and the cloud runs in a blocked layout (reorders) so every
    boundary term of the planner is exercised.
    """
    rng = random.Random(seed)
    order: list[str] = []
    inputs_of: dict[str, tuple[str, ...]] = {}
    ops: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {"x": (1, 3, 224, 224)}

    def add(op: str, ins: Sequence[str], shape: tuple[int, ...]) -> str:
        name = f"{op.lower()}_{len(order)}"
        order.append(name)
        inputs_of[name], ops[name], shapes[name] = tuple(ins), op, shape
        return name

    channels, side = 16, 112
    current = add("Conv", ["x"], (1, channels, side, side))
    while len(order) < nodes - 2:
        shape = (1, channels, side, side)
        kind = rng.random()
        if kind < 0.4:
            a = add("Relu", [add("Conv", [current], shape)], shape)
            b = add("Add", [add("Conv", [a], shape), current], shape)
            current = add("Relu", [b], shape)
        elif kind < 0.6:
            width = rng.randint(2, 4)
            branch = (1, max(channels // width, 1), side, side)
            ends = [add("Conv", [current], branch) for _ in range(width)]
            ends = [add("Relu", [e], branch) if rng.random() < 0.5 else e for e in ends]
            channels = branch[1] * width
            current = add("Concat", ends, (1, channels, side, side))
        elif kind < 0.7 and side > 7:
            side, channels = side // 2, min(channels * 2, 512)
            pooled = add("MaxPool", [current], (1, shape[1], side, side))
            current = add("Conv", [pooled], (1, channels, side, side))
        else:
            current = add(rng.choice(["Mul", "Sigmoid", "Reshape", "Clip"]), [current], shape)
    current = add("Gemm", [add("GlobalAveragePool", [current], (1, channels, 1, 1))], (1, 1000))
    readers: dict[str, list[str]] = {}
    for v in order:
        for t in inputs_of[v]:
            readers.setdefault(t, []).append(v)
    tensors = {t: TensorInfo(t, None if t == "x" else t, tuple(readers.get(t, ())), shapes[t], "float32")
               for t in ("x", *order)}
    weights = {v: 4 * shapes[v][1] * 9 * (shapes[inputs_of[v][0]][1] if ops[v] == "Conv" else 0) for v in order}
    graph = CutGraph(tuple(order), inputs_of, weights, tensors, ("x",), (current,), ops)
    edge = {v: 0.0 if ops[v] == "Relu" else rng.uniform(0.05, 3.0) for v in order}
    cloud = {v: ms / rng.uniform(10.0, 40.0) for v, ms in edge.items()}
    reorder_out = {v: 0.2 * cloud[v] for v in order if ops[v] not in ("Conv", "MaxPool")}
    costs = CostInputs(edge, cloud, edge_overhead_ms=2.0, cloud_overhead_ms=1.0,
                       edge_boundary=BoundaryRates(0.02, 4.0), cloud_boundary=BoundaryRates(0.005, 200.0, True),
                       cloud_reorder_out_ms=reorder_out, edge_active_w=6.0, edge_idle_w=2.0)
    return graph, costs


def zoo_graph(name: str) -> tuple[CutGraph, CostInputs]:
    """A zoo model's cut graph with rpi4 (int8) and t4 (fp32) roofline costs, as split-profile makes them."""
    import tempfile
    from pathlib import Path

    import onnx
    import torch

    from models.convert import to_onnx
    from models.zoo import build_zoo_model, zoo_entry
    from partitioning.device_profile import resolve_device
    from partitioning.devices import resolve_gpu
    from partitioning.estimate import estimate_node_costs
    from partitioning.graph import build_cut_graph

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = zoo_entry(name)
        path = to_onnx(build_zoo_model(name), (torch.randn(*entry.input_shape),), Path(tmp) / f"{name}.onnx")
        model = onnx.load(str(path))
    edge = estimate_node_costs(model, resolve_device("rpi4"), precision="int8")
    cloud = estimate_node_costs(model, resolve_gpu("t4"), precision="fp32")
    costs = CostInputs(dict(edge.per_node_ms), dict(cloud.per_node_ms), edge.overhead_ms, cloud.overhead_ms,
                       edge.boundary, cloud.boundary)
    return build_cut_graph(model), costs


@dataclass(frozen=True)
class Row:
    """One graph's result."""

    name: str
    nodes: int
    candidates: int
    seconds: float  # median over the repeats
    peak_mb: float  # peak traced Python memory of one run


def measure(name: str, graph: CutGraph, costs: CostInputs, repeats: int) -> Row:
    """Median time over `repeats` runs of plan_cuts, then one run under tracemalloc for the peak memory."""
    times = []
    plan = None
    for _ in range(repeats):
        start = time.perf_counter()
        plan = plan_cuts(graph, costs, LINK)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    plan_cuts(graph, costs, LINK)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan is not None
    return Row(name, len(graph.nodes), len(plan.candidates), statistics.median(times), peak / 2**20)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): the growth order."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def table(rows: Sequence[Row]) -> str:
    """The Markdown table of `rows`."""
    lines = ["| graph | nodes | candidates | search s (median) | peak MB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.nodes} | {r.candidates} | {r.seconds:.3f} | {r.peak_mb:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: measure, print the table and the growth order."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.planning_time", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="synthetic graph sizes (nodes)")
    p.add_argument("--repeats", type=int, default=3, help="runs per graph (the median is reported)")
    p.add_argument("--no-zoo", action="store_true", help="synthetic graphs only (no torch export)")
    args = p.parse_args(argv)
    say: Callable[[str], None] = lambda msg: print(f"# {msg}", file=sys.stderr, flush=True)  # noqa: E731
    rows: list[Row] = []
    if not args.no_zoo:
        for name in ZOO:
            say(f"exporting and planning {name}")
            rows.append(measure(name, *zoo_graph(name), args.repeats))
    synthetic = []
    for size in (int(s) for s in args.sizes.split(",") if s):
        say(f"planning a synthetic graph of {size} nodes")
        row = measure(f"synthetic-{size}", *synthetic_graph(size), args.repeats)
        rows.append(row)
        synthetic.append(row)
    print(table(rows))
    if len(synthetic) >= 2:
        n = [r.nodes for r in synthetic]
        print(f"\ngrowth order over the synthetic graphs: time ~ n^{slope(n, [r.seconds for r in synthetic]):.2f}, "
              f"peak memory ~ n^{slope(n, [r.peak_mb for r in synthetic]):.2f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
