"""Per-node cost of a model: measured with onnxruntime's profiler here, or estimated for a device table.

`measure_node_costs` needs only onnxruntime and numpy (the [edge] extra): a user runs it on the real
Raspberry Pi or Jetson. The ONNX graph is read with a small protobuf wire reader below, so neither onnx nor
torch is imported in this module; `estimate_node_costs` imports onnx (through `partitioning.flops`) lazily.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, replace, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from partitioning.devices import DeviceProfile, GpuProfile, _check_precision
from partitioning.flops import ELEM_BYTES, VIEW_OPS, base_op, numel, op_class, op_flops
from partitioning.planner import BoundaryRates

if TYPE_CHECKING:
    import onnx
    import onnxruntime

DEVICE_SCHEMA = "splitinfer.device/v1"
_PRECISION_BYTES = {"fp32": 1.0, "fp16": 0.5, "int8": 0.25}  # bytes moved relative to the fp32 graph


class DeviceProfileError(ValueError):
    """A saved device profile is unreadable, malformed, or does not fit the model it is used for."""


@dataclass(frozen=True)
class Throughput:
    """Effective (achieved) throughput fitted from measured node times."""

    gflops: float  # achieved on compute-class ops (Conv/Gemm/MatMul)
    gbps: float  # achieved on memory-class ops
    launch_ms: float  # fixed cost per executed op
    source: str


@dataclass(frozen=True)
class NodeCosts:
    """Milliseconds per node of one graph plus the fixed cost of one session.run."""

    per_node_ms: Mapping[str, float]  # every node of the graph (0.0 for nodes fused away by the runtime)
    overhead_ms: float  # fixed cost of one session.run, not attributed to nodes
    kind: str  # "measured" | "estimated"
    source: str
    fitted: Throughput | None = field(default=None, compare=False)  # measured only: what it achieved
    boundary: BoundaryRates | None = None  # what a cut adds on this side (partitioning.planner docstring)
    # measured only: the part of a node's time that was a layout conversion back from the blocked layout
    # (onnxruntime's ReorderOutput, charged to the node whose output it writes); included in per_node_ms
    reorder_out_ms: Mapping[str, float] = field(default_factory=dict)

    def total_ms(self, nodes: Iterable[str] | None = None) -> float:
        """Overhead plus the sum over `nodes` (all nodes when None)."""
        chosen = self.per_node_ms.values() if nodes is None else (self.per_node_ms.get(n, 0.0) for n in nodes)
        return self.overhead_ms + float(sum(chosen))


# --- reading the ONNX graph without onnx: the protobuf wire format ---------------------------------


@dataclass(frozen=True)
class _Node:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterable[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field in buf[start:end]; others are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
    if pos != end:
        raise ValueError("truncated protobuf message")


def _read_graph(path: Path) -> tuple[list[_Node], set[str]]:
    """Top-level nodes (names filled in as `<op>_<index>` when empty) and initializer names of an ONNX file."""
    buf = path.read_bytes()
    try:
        graph = next(((s, e) for n, s, e in _fields(buf, 0, len(buf)) if n == 7), None)  # ModelProto.graph
        if graph is None:
            raise ValueError("no graph in the file")
        nodes: list[_Node] = []
        initializers: set[str] = set()
        for number, start, end in _fields(buf, *graph):
            if number == 1:  # GraphProto.node -> NodeProto: input 1, output 2, name 3, op_type 4
                parts: dict[int, list[str]] = {1: [], 2: [], 3: [], 4: []}
                for n, s, e in _fields(buf, start, end):
                    if n in parts:
                        parts[n].append(buf[s:e].decode("utf-8"))
                op = parts[4][0] if parts[4] else ""
                name = parts[3][0] if parts[3] and parts[3][0] else f"{op}_{len(nodes)}"
                nodes.append(_Node(name, op, tuple(parts[1]), tuple(parts[2])))
            elif number == 5:  # GraphProto.initializer -> TensorProto.name is field 8
                initializers.update(buf[s:e].decode("utf-8") for n, s, e in _fields(buf, start, end) if n == 8)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable ONNX model ({exc})") from exc
    return nodes, initializers


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(*fields: tuple[int, int | bytes | str]) -> bytes:
    """A protobuf message from (field number, int | bytes | str) pairs: varints and length-delimited fields."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            out += _encode_varint(number << 3) + _encode_varint(value)
        else:
            data = value.encode("utf-8") if isinstance(value, str) else value
            out += _encode_varint(number << 3 | 2) + _encode_varint(len(data)) + data
    return bytes(out)


def one_op_model(op_type: str, dims: Sequence[int]) -> bytes:
    """An ONNX model of one float op (Identity, Relu, ...) from x to y of shape `dims`, written without onnx."""
    shape = _message(*((1, _message((1, int(d)))) for d in dims))  # TensorShapeProto { dim { dim_value } ... }
    tensor_type = _message((1, _message((1, 1), (2, shape))))  # TypeProto { tensor_type { elem_type: FLOAT, shape } }
    node = _message((1, "x"), (2, "y"), (3, "op"), (4, op_type))  # NodeProto input, output, name, op_type
    graph = _message((1, node), (2, op_type.lower()), (11, _message((1, "x"), (2, tensor_type))),
                     (12, _message((1, "y"), (2, tensor_type))))  # GraphProto node, name, input, output
    return _message((1, 8), (7, graph), (8, _message((1, ""), (2, 17))))  # ir_version 8, graph, opset 17


def identity_model() -> bytes:
    """One Identity on a float[1]: what one session.run costs besides its nodes."""
    return one_op_model("Identity", [1])


# --- measuring ---------------------------------------------------------------------------------------


def session_options(threads: int | None = None) -> "onnxruntime.SessionOptions":
    """The SessionOptions the head/tail runners use (models.ortopts), with `threads` intra-op threads."""
    from models.ortopts import session_options as project_options

    return project_options(threads, None, log_severity=2)


def default_providers() -> list[str]:
    """CUDA then CPU when onnxruntime has CUDA (a Jetson or a GPU host), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def host_facts(threads: int | None = None, providers: Sequence[str] | None = None) -> dict[str, Any]:
    """Platform, machine, CPU count, onnxruntime version and execution providers of this host."""
    import onnxruntime as ort

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "providers": list(providers or default_providers()),
        "threads": threads,
    }


_NUMPY_TYPES = {"float": "float32", "float16": "float16", "double": "float64", "int8": "int8", "uint8": "uint8",
                "int16": "int16", "uint16": "uint16", "int32": "int32", "uint32": "uint32", "int64": "int64",
                "uint64": "uint64", "bool": "bool"}


def _random_inputs(session: Any, batch: int, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, Any]:
    """Random inputs at the model's shapes: dynamic batch -> `batch`; floats ~ N(0,1), integers 0."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        type_name = arg.type[len("tensor("):-1] if arg.type.startswith("tensor(") else arg.type
        if type_name not in _NUMPY_TYPES:
            raise ValueError(f"input {arg.name!r}: unsupported type {arg.type}; expected a numeric tensor")
        if shapes and arg.name in shapes:
            shape = tuple(int(d) for d in shapes[arg.name])
        else:
            shape = []
            for axis, dim in enumerate(arg.shape):
                if isinstance(dim, int) and dim > 0:
                    if axis == 0 and batch != 1 and dim != batch:
                        raise ValueError(f"input {arg.name!r} has a fixed batch of {dim}; cannot measure batch {batch}")
                    shape.append(dim)
                elif axis == 0:
                    shape.append(batch)
                else:
                    raise ValueError(
                        f"input {arg.name!r} has dynamic dimension {axis} ({dim!r}) in shape {arg.shape}; "
                        "pass input_shapes={name: shape} to measure it"
                    )
        dtype = np.dtype(_NUMPY_TYPES[type_name])
        if dtype.kind == "f":
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = np.zeros(shape, dtype=dtype)
    return feeds


_CHUNK = 5  # runs per turn when the profiled and the plain session take turns
PROBE_ELEMENTS = (4096, 262_144)  # Relu probes over 16 KB and 1 MB of floats
# The least span of a measurement's turns. On the 2-core development VM the host's speed drifts by 10-20%
# over fractions of a second: two 30-run medians of tiny_cnn (4 ms each) 2 s apart differ by 18% on average,
# two 1-second medians by 9% (benchmarks/planner_accuracy.py, README).
MIN_SECONDS = 1.0


def measure_node_costs(
    onnx_path: Path,
    *,
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
    batch: int = 1,
    progress: Callable[[int, int], None] | None = None,
    providers: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    min_seconds: float = MIN_SECONDS,
) -> NodeCosts:
    """Median per-node times of `onnx_path` from onnxruntime's profiler, mapped back to the original nodes.

    The profiled runs give each node's share; the unprofiled session's wall time, timed in turns with it
    (and on alone until the turns span `min_seconds`), gives the scale.
    """
    import numpy as np
    import onnxruntime as ort

    if repeats < 1 or warmup < 0 or not min_seconds >= 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and min_seconds >= 0, got repeats={repeats} "
                         f"warmup={warmup} min_seconds={min_seconds}")
    onnx_path = Path(onnx_path)
    nodes, initializers = _read_graph(onnx_path)
    providers = list(providers or default_providers())
    total_runs = 2 * (warmup + repeats)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total_runs)

    with tempfile.TemporaryDirectory(prefix="splitinfer-profile-") as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        # The optimized graph tells which original tensors each fused node reads and writes.
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3  # saving an NCHWc-optimized graph warns that it is host-specific
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception:  # noqa: BLE001 - compiling EPs and >2 GB graphs cannot save it: profile without
            options.optimized_model_filepath = ""
            session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        feeds = _random_inputs(session, batch, input_shapes)
        # The unprofiled session's wall times scale the node times below. The two sessions take turns in
        # chunks of runs, so a stretch of background load on the host slows both alike instead of skewing the
        # scale, while each still runs back to back as a deployed session does (a pool's first run after
        # another session ran pays for waking its threads).
        plain = ort.InferenceSession(str(onnx_path), session_options(threads), providers=providers)
        # Probes, timed in the same turns: a one-Identity model's run is what every session.run costs besides
        # its nodes (binding the feeds, allocating outputs, handing them to Python), which a cut model pays
        # twice; one Relu over 16 KB and one over 1 MB give the memory rate of a lone kernel, at which the
        # kernels a cut adds are costed (partitioning.planner, boundary terms).
        probes: dict[Any, tuple[Any, dict]] = {}
        for name, op, n in (("fixed", "Identity", 1), *((n, "Relu", n) for n in PROBE_ELEMENTS)):
            probe = ort.InferenceSession(one_op_model(op, [n]), session_options(threads), providers=providers)
            probes[name] = probe, {"x": np.zeros(n, np.float32)}
        walls: list[float] = []
        probe_walls: dict[Any, list[float]] = {name: [] for name in probes}
        goal, ran, start = warmup + repeats, 0, time.perf_counter()
        # The turns go on, without the profiled session, until they span min_seconds: a small model's few
        # dozen runs take milliseconds, one draw of a host whose speed drifts over seconds (README).
        while ran < goal or time.perf_counter() - start < min_seconds:
            count = min(_CHUNK, goal - ran) if ran < goal else _CHUNK
            if ran < goal:
                for _ in range(count):
                    session.run(None, feeds)
                    tick()
            plain.run(None, feeds)  # wakes its pool after the other session's turn; not counted
            for i in range(ran, ran + count):
                start_run = time.perf_counter()
                plain.run(None, feeds)
                if i >= warmup:
                    walls.append((time.perf_counter() - start_run) * 1000.0)
                if i < goal:
                    tick()
            for name, (probe, probe_feeds) in probes.items():
                probe.run(None, probe_feeds)
                for _ in range(count):
                    start_run = time.perf_counter()
                    probe.run(None, probe_feeds)
                    probe_walls[name].append((time.perf_counter() - start_run) * 1000.0)
            ran += count
        span = time.perf_counter() - start
        del plain, probes
        events = json.loads(Path(session.end_profiling()).read_text())
        try:
            optimized, _ = _read_graph(Path(tmp) / "optimized.onnx")
        except (OSError, ValueError):  # not every EP can save its graph; names alone still map most nodes
            optimized = []
        del session

    runs = _node_times_per_run(events)[warmup:]
    if len(runs) != repeats:
        raise RuntimeError(f"onnxruntime profile of {onnx_path} has {len(runs) + warmup} runs, expected "
                           f"{warmup + repeats}: cannot attribute node times")
    mapper = _Attribution(nodes, initializers, optimized)
    mapper.pair_unnamed(runs[0])
    per_run = [mapper.attribute(run) for run in runs]
    per_node = {n.name: statistics.median(r[0].get(n.name, 0.0) for r in per_run) for n in nodes}
    unattributed = statistics.median(r[1] for r in per_run)
    reorder_out = _reorder_out(mapper, runs)

    node_sum = sum(per_node.values())
    wall = statistics.median(walls)
    # What the profiler does not see (dispatch, allocation, thread wake-ups, preemption) grows with the
    # work, so only the fixed cost of a run (the Identity model's) stays a per-run overhead; node times are
    # scaled so that nodes plus overhead equal the unprofiled wall time (down when the profiler inflated tiny
    # kernels, up otherwise).
    probe_ms = {name: statistics.median(times) for name, times in probe_walls.items()}
    overhead = min(probe_ms["fixed"], wall)
    scaled = ""
    if node_sum > 0 and wall > overhead:
        factor = (wall - overhead) / node_sum
        per_node = {name: ms * factor for name, ms in per_node.items()}
        reorder_out = {name: ms * factor for name, ms in reorder_out.items()}
        scaled = f"; node times scaled by {factor:.2f} to add up to the unprofiled wall time"
    fitted = _fit_throughput(runs)
    boundary = _boundary_rates(probe_ms, fitted, runs)
    host = host_facts(threads, providers)
    fused = sum(1 for v in per_node.values() if v == 0.0)
    source = (
        f"measured on this host ({host['machine']}, {host['platform']}, {threads or 'default'} threads, "
        f"{providers[0]}, onnxruntime {host['onnxruntime']}), median of {repeats} profiled runs after {warmup} "
        f"warm-up; unprofiled wall time the median of {len(walls)} runs over {span:.1f} s; "
        f"{fused} of {len(nodes)} nodes fused away or constant-folded (0 ms); overhead = median "
        f"session.run of a one-Identity model, {overhead * 1000:.1f} us"
        + (f"; {unattributed:.3f} ms of runtime-inserted nodes spread over the nodes by the scaling"
           if unattributed > 0 else "")
        + scaled
        + ("; note: with a GPU execution provider the profiler times host-side kernel launches, so GPU "
           "execution time shows up in the overhead" if providers[0] != "CPUExecutionProvider" else "")
    )
    return NodeCosts(per_node, overhead, "measured", source + _describe(boundary), fitted, boundary, reorder_out)


def _reorder_out(mapper: _Attribution, runs: list[list[tuple[str, str, float, dict]]]) -> dict[str, float]:
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


LAYOUT_REORDERS = frozenset({"ReorderInput", "ReorderOutput"})  # onnxruntime's NCHWc conversions (x86)


def _describe(rates: BoundaryRates | None) -> str:
    if rates is None:
        return ""
    return (f"; a cut adds kernels at {rates.launch_ms * 1000:.1f} us + bytes / {rates.gbps:.2f} GB/s each"
            + (" (the runtime reorders 4-D activations' layout)" if rates.reorders else ""))


def _boundary_rates(probe_ms: Mapping[Any, float], fit: Throughput | None,
                    runs: list[list[tuple[str, str, float, dict]]]) -> BoundaryRates:
    """What a kernel that a cut adds costs here: the fitted launch plus its bytes at the Relu probes' rate.

    A probe's time less the Identity run's is the kernel's work, launch excluded (both runs launch one
    kernel); the slope between the 16 KB and the 1 MB Relu is ms per byte written (the planner costs a cut's
    extra kernels by the bytes they write). Reorders: whether the runtime put layout conversions into this
    model's run.
    """
    small, large = PROBE_ELEMENTS
    per_byte = max(probe_ms[large] - probe_ms[small], 1e-9) / (4 * (large - small))
    reorders = any(op in LAYOUT_REORDERS for run in runs[:1] for _, op, _, _ in run)
    return BoundaryRates(fit.launch_ms if fit is not None else 0.0, 1e-6 / per_byte, reorders)


def _node_times_per_run(events: list[dict[str, Any]]) -> list[list[tuple[str, str, float, dict]]]:
    """Per session.run, the kernel events (profiled name, op, ms, args) that fall inside that run."""
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                        if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs: list[list[tuple[str, str, float, dict]]] = [[] for _ in model_runs]
    starts = [s for s, _ in model_runs]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        index = _bisect_right(starts, e["ts"]) - 1
        if index >= 0 and e["ts"] <= model_runs[index][1]:
            args = e.get("args", {})
            runs[index].append((e["name"][: -len("_kernel_time")], str(args.get("op_name", "")),
                                e["dur"] / 1000.0, args))
    return runs


def _bisect_right(values: list[float], x: float) -> int:
    import bisect

    return bisect.bisect_right(values, x)


class _Attribution:
    """Maps each node onnxruntime ran (possibly fused or renamed) to one node of the original graph."""

    _TOKEN = re.compile(r"(_token_\d+)+$")

    def __init__(self, nodes: list[_Node], initializers: set[str], optimized: list[_Node]) -> None:
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

    def pair_unnamed(self, run: list[tuple[str, str, float, dict]]) -> None:
        """Pair profiled nodes whose names the saved optimized graph does not use, per op type in order.

        onnxruntime names unnamed fused nodes `<op>_<index>` in the profile but renumbers them when it saves
        the graph; both lists are in topological order, so the k-th of each op type correspond.
        """
        profiled = {name for name, _, _, _ in run}
        spare: dict[str, list[_Node]] = {}
        for node in self.optimized.values():
            if node.name not in profiled:
                spare.setdefault(node.op_type, []).append(node)
        for name, op, _, _ in run:
            if name not in self.optimized and spare.get(op):
                self.optimized[name] = spare[op].pop(0)

    def attribute(self, run: list[tuple[str, str, float, dict]]) -> tuple[dict[str, float], float]:
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
        region, stack = set(), [self.producer[o] for o in outs]
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


_TYPE_NAMES = {"float": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7, "bool": 9,
               "float16": 10, "double": 11, "uint32": 12, "uint64": 13, "bfloat16": 16}


def _event_work(op: str, args: Mapping[str, Any]) -> tuple[float, int]:
    """FLOPs and bytes moved of one profiled kernel, from the shapes onnxruntime recorded."""
    def shapes(key: str) -> list[tuple[tuple[int, ...], int]]:
        out = []
        for item in args.get(key, []) or []:
            for type_name, dims in item.items():
                out.append((tuple(int(d) for d in dims), ELEM_BYTES.get(_TYPE_NAMES.get(type_name, 1), 4)))
        return out

    ins, outs = shapes("input_type_shape"), shapes("output_type_shape")
    flops = op_flops(op, [s for s, _ in ins], [s for s, _ in outs])
    moved = sum(numel(s) * size for s, size in (*ins, *outs))
    return flops, moved


def _fit_throughput(runs: list[list[tuple[str, str, float, dict]]]) -> Throughput | None:
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


# --- estimating -------------------------------------------------------------------------------------


def _roofline(
    model: "onnx.ModelProto", gflops: float, gbps: float, launch_ms: float, byte_scale: float = 1.0
) -> tuple[dict[str, float], int]:
    """Per-node ms by the roofline below; nodes the runtime folds or fuses away cost 0. Also their count."""
    from partitioning.flops import node_stats, runtime_free_nodes

    stats = node_stats(model)
    free = runtime_free_nodes(model)
    per_node = {}
    for name, s in stats.items():
        if name in free:
            per_node[name] = 0.0
            continue
        moved = 0.0 if s.op_type in VIEW_OPS else s.bytes_total * byte_scale
        # time_ms = max(FLOPs / (GFLOP/s * 1e6), bytes / (GB/s * 1e6)) + launch_ms
        #   (1 GFLOP/s = 1e6 FLOP per ms; the effective rates already include the efficiency factors)
        per_node[name] = max(s.flops / (gflops * 1e6), moved / (gbps * 1e6)) + launch_ms
    return per_node, len(free)


def estimate_node_costs(
    model: "onnx.ModelProto",
    device: "DeviceProfile | GpuProfile | MeasuredDeviceProfile",
    *,
    precision: str = "fp32",
) -> NodeCosts:
    """Roofline per-node costs of `model` on a device table entry (or a measured profile's fitted rates)."""
    _check_precision(precision)
    if isinstance(device, MeasuredDeviceProfile):
        return device.estimate(model)
    # Effective rates: peak at this precision x achieved fraction (compute for FLOPs, memory for bytes).
    gflops = device.peak_gflops(precision) * device.compute_efficiency
    gbps = device.memory_gbps * device.memory_efficiency
    per_node, free = _roofline(model, gflops, gbps, device.launch_overhead_ms, _PRECISION_BYTES[precision])
    overhead = 10.0 * device.launch_overhead_ms
    source = (
        f"estimated for {device.name} from its device table at {precision}: roofline per node, "
        f"max(FLOPs / {gflops:.1f} GFLOP/s, bytes / {gbps:.1f} GB/s) + {device.launch_overhead_ms} ms launch "
        f"(peak {device.peak_gflops(precision):g} x {device.compute_efficiency} efficiency, "
        f"{device.memory_gbps:g} GB/s x {device.memory_efficiency}); {free} nodes constant-folded or fused "
        f"(0 ms); session overhead ~10 launches (approximate)"
    )
    return NodeCosts(per_node, overhead, "estimated", source, boundary=BoundaryRates(device.launch_overhead_ms, gbps))


# --- saved device profiles ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredDeviceProfile:
    """Node costs measured on a device for one model, plus the throughput fitted from them."""

    name: str
    model_sha256: str
    host: Mapping[str, Any]
    costs: NodeCosts
    fitted: Throughput | None
    path: Path | None = None
    active_w: float | None = None  # the device's power when the user gave it at save time
    idle_w: float | None = None

    def costs_for(self, model: "onnx.ModelProto", model_sha256: str) -> NodeCosts:
        """The measured costs when `model` is the measured model, else an estimate from the fitted rates.

        The model is the measured one when its sha256 matches, or when its node names are exactly the
        measured ones: re-saving a model (the loader normalizes every file) changes its bytes, not its
        nodes, so a profile measured on a bundle's full.onnx on the device matches the same model here.
        """
        names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]
        if model_sha256 == self.model_sha256:
            missing = [n for n in names if n not in self.costs.per_node_ms]
            if missing:
                raise DeviceProfileError(
                    f"device profile {self.name}: model sha256 matches but nodes {missing[:5]} are not in it"
                )
            return self.costs
        if set(names) == set(self.costs.per_node_ms):
            return replace(self.costs, source=f"{self.costs.source} (profile {self.name}, matched by node names)")
        return self.estimate(model)

    def estimate(self, model: "onnx.ModelProto") -> NodeCosts:
        """Roofline costs of another model from the throughput this device achieved on the measured one."""
        if self.fitted is None:
            raise DeviceProfileError(
                f"device profile {self.name} was measured on model sha256 {self.model_sha256[:12]}... and has no "
                "fitted throughput to estimate another model from: measure this model on the device"
            )
        fit = self.fitted
        per_node, free = _roofline(model, fit.gflops, fit.gbps, fit.launch_ms)
        source = (
            f"estimated from measured profile {self.name} (host {self.host.get('machine', '?')}, measured on "
            f"another model, sha256 {self.model_sha256[:12]}...): roofline with its {fit.source}; "
            f"{free} nodes constant-folded or fused (0 ms); overhead as measured"
        )
        boundary = self.costs.boundary or BoundaryRates(fit.launch_ms, fit.gbps)
        return NodeCosts(per_node, self.costs.overhead_ms, "estimated", source, boundary=boundary)


def save_device_profile(
    path: Path | str,
    costs: NodeCosts,
    *,
    model_sha256: str,
    host: Mapping[str, Any],
    name: str | None = None,
    active_w: float | None = None,
    idle_w: float | None = None,
) -> None:
    """Write measured node costs as a `splitinfer.device/v1` JSON profile."""
    if costs.kind != "measured":
        raise ValueError(f"only measured costs make a device profile, got kind {costs.kind!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", model_sha256 or ""):
        raise ValueError(f"model_sha256 must be 64 lowercase hex digits, got {model_sha256!r}")
    fit = costs.fitted
    doc = {
        "schema": DEVICE_SCHEMA,
        "name": name or f"measured-{host.get('machine', 'host')}",
        "model_sha256": model_sha256,
        "host": dict(host),
        "source": costs.source,
        "overhead_ms": costs.overhead_ms,
        "per_node_ms": dict(costs.per_node_ms),
        "fitted": None if fit is None else {"gflops": fit.gflops, "gbps": fit.gbps, "launch_ms": fit.launch_ms,
                                            "source": fit.source},
        "power": {"active_w": active_w, "idle_w": idle_w},
        "boundary": None if costs.boundary is None else {"launch_ms": costs.boundary.launch_ms,
                                                         "gbps": costs.boundary.gbps,
                                                         "reorders": costs.boundary.reorders},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)  # never leave a half-written profile


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DeviceProfileError(f"{where}: expected a finite number >= 0, got {value!r}")
    return float(value)


def load_device_profile(path: Path | str) -> MeasuredDeviceProfile:
    """Read a `splitinfer.device/v1` profile written by `save_device_profile`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise DeviceProfileError(f"device profile {path}: cannot read it ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeviceProfileError(f"device profile {path}: not JSON ({exc})") from exc
    where = f"device profile {path}"
    if not isinstance(doc, dict) or doc.get("schema") != DEVICE_SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise DeviceProfileError(f"{where}: expected schema {DEVICE_SCHEMA!r}, got {got!r}")
    sha = doc.get("model_sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise DeviceProfileError(f"{where}: model_sha256 must be 64 hex digits, got {sha!r}")
    nodes = doc.get("per_node_ms")
    if not isinstance(nodes, dict) or not nodes:
        raise DeviceProfileError(f"{where}: per_node_ms must be a non-empty object of node name -> ms")
    per_node = {str(k): _number(v, f"{where}: per_node_ms[{k!r}]") for k, v in nodes.items()}
    overhead = _number(doc.get("overhead_ms"), f"{where}: overhead_ms")
    host = doc.get("host")
    if not isinstance(host, dict):
        raise DeviceProfileError(f"{where}: host must be an object, got {host!r}")
    fitted = None
    fit = doc.get("fitted")
    if fit is not None:
        if not isinstance(fit, dict):
            raise DeviceProfileError(f"{where}: fitted must be an object or null, got {fit!r}")
        fitted = Throughput(
            gflops=_number(fit.get("gflops"), f"{where}: fitted.gflops"),
            gbps=_number(fit.get("gbps"), f"{where}: fitted.gbps"),
            launch_ms=_number(fit.get("launch_ms"), f"{where}: fitted.launch_ms"),
            source=str(fit.get("source", "")),
        )
        if fitted.gflops <= 0 or fitted.gbps <= 0:
            raise DeviceProfileError(f"{where}: fitted gflops and gbps must be > 0, got {fit!r}")
    power = doc.get("power") or {}
    if not isinstance(power, dict):
        raise DeviceProfileError(f"{where}: power must be an object, got {power!r}")
    watts = {k: None if power.get(k) is None else _number(power[k], f"{where}: power.{k}")
             for k in ("active_w", "idle_w")}
    boundary = None
    rates = doc.get("boundary")  # absent in profiles saved before it was measured: the fitted rates stand in
    if rates is not None:
        if not isinstance(rates, dict) or not isinstance(rates.get("reorders", False), bool):
            raise DeviceProfileError(f"{where}: boundary must be an object with launch_ms, gbps, reorders, "
                                     f"got {rates!r}")
        gbps = _number(rates.get("gbps"), f"{where}: boundary.gbps")
        if gbps <= 0:
            raise DeviceProfileError(f"{where}: boundary.gbps must be > 0, got {gbps}")
        boundary = BoundaryRates(_number(rates.get("launch_ms"), f"{where}: boundary.launch_ms"), gbps,
                                 rates.get("reorders", False))
    elif fitted is not None:
        boundary = BoundaryRates(fitted.launch_ms, fitted.gbps)
    name = str(doc.get("name") or path.stem)
    costs = NodeCosts(per_node, overhead, "measured", f"{doc.get('source', 'measured')} (loaded from {path})",
                      fitted, boundary)
    return MeasuredDeviceProfile(name, sha, host, costs, fitted, path, watts["active_w"], watts["idle_w"])
