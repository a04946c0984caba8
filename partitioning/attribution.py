"""Profiler events to original nodes: which node of the model each kernel onnxruntime ran belongs to.

onnxruntime fuses, renames and inserts nodes (layout reorders, QDQ pairs) before it runs a graph; its
profiler reports kernels by their runtime names. `Attribution` maps each back to one node of the original
graph, using the optimized graph it saved when it names the original tensors a fused node reads and writes.
`fit_throughput` fits the rates a device achieved from the same kernels' recorded shapes.
"""

from __future__ import annotations

import bisect
import re
import statistics
from collections.abc import Mapping
from typing import Any

from models.dtypes import BY_ORT_NAME, FLOAT, itemsize
from partitioning.costtypes import Throughput
from partitioning.flops import base_op, numel, op_class, op_flops
from partitioning.onnxwire import OnnxNode

KernelRun = list[tuple[str, str, float, dict]]  # one session.run's kernels: (profiled name, op, ms, args)
LAYOUT_REORDERS = frozenset({"ReorderInput", "ReorderOutput"})  # onnxruntime's NCHWc conversions (x86)


def kernel_runs(events: list[dict[str, Any]]) -> list[KernelRun]:
    """Per session.run, the kernel events (profiled name, op, ms, args) that fall inside that run."""
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                        if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs: list[KernelRun] = [[] for _ in model_runs]
    starts = [s for s, _ in model_runs]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        index = bisect.bisect_right(starts, e["ts"]) - 1
        if index >= 0 and e["ts"] <= model_runs[index][1]:
            args = e.get("args", {})
            runs[index].append((e["name"][: -len("_kernel_time")], str(args.get("op_name", "")),
                                e["dur"] / 1000.0, args))
    return runs

class Attribution:
    """Maps each node onnxruntime ran (possibly fused or renamed) to one node of the original graph."""

    _TOKEN = re.compile(r"(_token_\d+)+$")

    def __init__(self, nodes: list[OnnxNode], initializers: set[str], optimized: list[OnnxNode]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.order = {n.name: i for i, n in enumerate(nodes)}
        self.producer = {o: n.name for n in nodes for o in n.outputs if o}
        self.consumers: dict[str, list[str]] = {}
        for n in nodes:
            for i in n.inputs:
                self.consumers.setdefault(i, []).append(n.name)
        self.initializers = initializers
        self.optimized = {n.name: n for n in optimized}
        self.internal = {o for n in optimized for o in n.outputs if o not in self.producer}
        self.cache: dict[tuple[str, str], str | None] = {}

    def pair_unnamed(self, run: KernelRun) -> None:
        """Pair profiled nodes whose names the saved optimized graph does not use, per op type in order.

        onnxruntime names unnamed fused nodes `<op>_<index>` in the profile but renumbers them when it saves
        the graph; both lists are in topological order, so the k-th of each op type correspond.
        """
        profiled = {name for name, _, _, _ in run}
        spare: dict[str, list[OnnxNode]] = {}
        for node in self.optimized.values():
            if node.name not in profiled:
                spare.setdefault(node.op_type, []).append(node)
        for name, op, _, _ in run:
            if name not in self.optimized and spare.get(op):
                self.optimized[name] = spare[op].pop(0)

    def attribute(self, run: KernelRun) -> tuple[dict[str, float], float]:
        """Per original node, the summed ms of what ran for it; plus the ms nothing could be mapped to."""
        times: dict[str, float] = {}
        lost = 0.0
        for name, op, ms, _ in run:
            key = (name, op)
            if key not in self.cache:
                self.cache[key] = self.owner(name, op)
            owner = self.cache[key]
            if owner is None:
                lost += ms
            else:
                times[owner] = times.get(owner, 0.0) + ms
        return times, lost

    def owner(self, name: str, op: str) -> str | None:
        """The original node a profiled node belongs to, or None."""
        if name in self.nodes:
            return name
        stripped = self._TOKEN.sub("", name)  # QDQ and layout passes append _token_<n> to the original name
        if stripped in self.nodes:
            return stripped
        if stripped.endswith("_nchwc") and stripped[: -len("_nchwc")] in self.producer:
            # NCHWc convs are named after the (fused) output tensor: find the op that did the work upstream.
            return self._nearest_matching(self.producer[stripped[: -len("_nchwc")]], op)
        by_tensors = self._by_tensors(name, op)
        if by_tensors is not None:
            return by_tensors
        prefixes = [n for n in self.nodes if stripped.startswith(n + "/")]  # e.g. "<node>/MatMulScaleFusion/"
        return max(prefixes, key=len) if prefixes else None

    def _matches(self, node: str, op: str) -> bool:
        return bool(op) and base_op(self.nodes[node].op_type) == base_op(op)

    def _nearest_matching(self, start: str, op: str, depth: int = 4) -> str:
        frontier, seen = [start], {start}
        for _ in range(depth + 1):
            for node in frontier:
                if self._matches(node, op):
                    return node
            frontier = [self.producer[i] for n in frontier for i in self.nodes[n].inputs
                        if i in self.producer and self.producer[i] not in seen]
            seen.update(frontier)
        return start

    def _by_tensors(self, name: str, op: str) -> str | None:
        """The original region between the fused node's original input and output tensors."""
        fused = self.optimized.get(name)
        if fused is None:
            return None
        outs = [o for o in fused.outputs if o in self.producer]
        bounds = {i for i in fused.inputs if i in self.producer or i in self.consumers}
        if not outs:  # e.g. a layout reorder of a graph input: charge the first original reader
            readers = [c for i in fused.inputs if i in self.consumers for c in self.consumers[i]]
            return min(readers, key=self.order.__getitem__) if readers else None
        if any(i in self.internal for i in fused.inputs):  # reads a runtime-made tensor: the region is unbounded
            return self.producer[outs[0]]
        region: set[str] = set()
        stack = [self.producer[o] for o in outs]
        while stack and len(region) <= 32:
            node = stack.pop()
            if node in region:
                continue
            region.add(node)
            stack.extend(self.producer[i] for i in self.nodes[node].inputs
                         if i not in bounds and i in self.producer)
        if len(region) > 32:  # unbounded walk: inputs were not original tensors
            region = {self.producer[o] for o in outs}
        ranked = sorted(region, key=self.order.__getitem__)
        for wanted in (lambda n: self._matches(n, op), lambda n: op_class(self.nodes[n].op_type) == "compute"):
            hits = [n for n in ranked if wanted(n)]
            if hits:
                return hits[0]
        return self.producer[outs[0]]

def reorder_out_ms(mapper: Attribution, runs: list[KernelRun]) -> dict[str, float]:
    """Per original node, the median ms of the ReorderOutput kernels charged to it (nodes with any only)."""
    per_run: list[dict[str, float]] = []
    for run in runs:
        got: dict[str, float] = {}
        for name, op, ms, _ in run:
            owner = mapper.cache.get((name, op)) if op == "ReorderOutput" else None
            if owner is not None:
                got[owner] = got.get(owner, 0.0) + ms
        per_run.append(got)
    owners = {n for got in per_run for n in got}
    return {n: statistics.median(got.get(n, 0.0) for got in per_run) for n in owners}

def _event_work(op: str, args: Mapping[str, Any]) -> tuple[float, int]:
    """FLOPs and bytes moved of one profiled kernel, from the shapes onnxruntime recorded."""
    def shapes(key: str) -> list[tuple[tuple[int, ...], int]]:
        out = []
        for item in args.get(key, []) or []:
            for type_name, dims in item.items():
                out.append((tuple(int(d) for d in dims), itemsize(BY_ORT_NAME.get(type_name, FLOAT))))
        return out

    ins, outs = shapes("input_type_shape"), shapes("output_type_shape")
    flops = op_flops(op, [s for s, _ in ins], [s for s, _ in outs])
    moved = sum(numel(s) * size for s, size in (*ins, *outs))
    return flops, moved


def fit_throughput(runs: list[KernelRun]) -> Throughput | None:
    """Achieved GFLOP/s on compute ops, GB/s on memory ops and per-op launch cost, from the profiled kernels.

    launch = half the fastest kernel's median time (an upper bound on what every kernel pays to start);
    gflops = sum(compute FLOPs) / sum(compute time - launch); gbps = sum(memory bytes) / sum(memory time - launch)
    (time minus launch floored at 10% of the time). Uses the kernels as run, so it needs no onnx.
    """
    samples: dict[str, list[float]] = {}
    work: dict[str, tuple[str, float, int]] = {}
    for run in runs:
        for name, op, ms, args in run:
            samples.setdefault(name, []).append(ms)
            if name not in work:
                work[name] = (op, *_event_work(op, args))
    if not samples:
        return None
    medians = {n: statistics.median(v) for n, v in samples.items()}
    launch = 0.5 * min(medians.values())
    sums = {"compute": [0.0, 0.0], "memory": [0.0, 0.0]}  # class -> [work, ms]
    for name, ms in medians.items():
        op, flops, moved = work[name]
        cls = op_class(op)
        sums[cls][0] += flops if cls == "compute" else moved
        sums[cls][1] += max(ms - launch, 0.1 * ms)
    mem_work, mem_ms = sums["memory"]
    gbps = mem_work / mem_ms / 1e6 if mem_ms > 0 and mem_work > 0 else 1.0
    comp_work, comp_ms = sums["compute"]
    gflops = comp_work / comp_ms / 1e6 if comp_ms > 0 and comp_work > 0 else gbps  # no compute ops: ~1 FLOP/byte
    return Throughput(
        gflops=gflops, gbps=gbps, launch_ms=launch,
        source=f"fitted from {len(medians)} profiled kernels: {gflops:.2f} GFLOP/s on Conv/Gemm/MatMul, "
               f"{gbps:.2f} GB/s on memory-bound ops, {launch * 1000:.1f} us per op",
    )
