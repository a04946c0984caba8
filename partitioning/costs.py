"""Per-node cost of a model, measured on this host with onnxruntime's profiler.

`measure_node_costs` needs only onnxruntime and numpy (the [edge] extra): a user runs it on the real
Raspberry Pi or Jetson. The ONNX graph is read by protobuf from the declarations of `partitioning.onnxwire`, so
neither onnx nor torch is imported here. The profiler's kernels are mapped back to the model's nodes by
`partitioning.attribution`; estimates for other devices are `partitioning.estimate`, saved profiles
`partitioning.device_profile`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.dtypes import NUMERIC_ORT_NAMES, ort_numpy_dtype, ort_type_name
from models.inputs import random_array
from models.ortopts import CPU_EP, CUDA_EP, TENSORRT_EP, make_session
from partitioning.attribution import (
    LAYOUT_REORDERS,
    Attribution,
    KernelRun,
    fit_throughput,
    kernel_runs,
    reorder_out_ms,
)
from partitioning.costtypes import BoundaryRates, NodeCosts, Throughput
from partitioning.onnxwire import one_op_model, read_graph

if TYPE_CHECKING:
    import onnxruntime


def session_options(threads: int | None = None) -> onnxruntime.SessionOptions:
    """The SessionOptions the head/tail runners use (models.ortopts), with `threads` intra-op threads."""
    from models.ortopts import session_options as project_options

    return project_options(threads, None, log_severity=3)  # its warnings (e.g. unused initializers) are noise here


def default_providers() -> list[str]:
    """CUDA then CPU when onnxruntime has CUDA (a Jetson or a GPU host), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def host_facts(threads: int | None = None, providers: Sequence[str] | None = None) -> dict[str, Any]:
    """Platform, machine, CPU count, the runtime (onnxruntime, its version) and the execution providers measured."""
    import onnxruntime as ort

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "runtime": "onnxruntime",
        "onnxruntime": ort.__version__,
        "providers": list(providers or default_providers()),
        "threads": threads,
    }


def _random_inputs(session: Any, batch: int, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, Any]:
    """Random inputs at the model's shapes: dynamic batch -> `batch`; floats ~ N(0,1), integers 0."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        type_name = ort_type_name(arg.type)
        if type_name not in NUMERIC_ORT_NAMES:
            raise ValueError(f"input {arg.name!r}: unsupported type {arg.type}; expected a numeric tensor")
        if shapes and arg.name in shapes:
            shape = [int(d) for d in shapes[arg.name]]
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
        feeds[arg.name] = random_array(rng, shape, ort_numpy_dtype(type_name), zero_integers=True)
    return feeds


_CHUNK = 5  # runs per turn when the profiled and the plain session take turns
PROBE_ELEMENTS = (4096, 262_144)  # Relu probes over 16 KB and 1 MB of floats
# The least span of a measurement's turns. On the 2-core development VM the host's speed drifts by 10-20%
# over fractions of a second: two 30-run medians of tiny_cnn (4 ms each) 2 s apart differ by 18% on average,
# two 1-second medians by 9% (benchmarks/planner_accuracy.py, README).
MIN_SECONDS = 1.0
MIN_REPEATS = 5  # profiled runs a measurement under a time budget keeps (measure_node_costs max_seconds)


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
    provider_options: Mapping[str, Mapping[str, str]] | None = None,
    max_seconds: float | None = None,
) -> NodeCosts:
    """Median per-node times of `onnx_path` from onnxruntime's profiler, mapped back to the original nodes.

    `max_seconds`: when `warmup + repeats` turns (a profiled and an unprofiled run each) would take longer than
    this, as the first run shows, fewer are run: at least MIN_REPEATS profiled runs after at most two warm-ups
    (a large model's node times are long beside the timer's noise; `source` says how many ran).

    The profiled runs give each node's share; the unprofiled session's wall time, timed in turns with it
    (and on alone until the turns span `min_seconds`), gives the scale. `providers` (default: CUDA when
    present, then CPU) and `provider_options` go to every session (models.ortopts.make_session). A provider
    that runs the graph as fused subgraphs (OpenVINO, TensorRT) shows in the profile as one kernel per subgraph,
    naming no node: when those outweigh the attributed kernels, the nodes' shares (and the boundary rates) come
    from a CPU-provider profile of the same model, scaled to this provider's unprofiled wall time.
    """
    import numpy as np

    if repeats < 1 or warmup < 0 or not min_seconds >= 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and min_seconds >= 0, got repeats={repeats} "
                         f"warmup={warmup} min_seconds={min_seconds}")
    onnx_path = Path(onnx_path)
    nodes, initializers = read_graph(onnx_path)
    providers = list(providers or default_providers())
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
            session = make_session(onnx_path, options=options, providers=providers, provider_options=provider_options)
        except Exception:  # noqa: BLE001 - compiling EPs and >2 GB graphs cannot save it: profile without
            options.optimized_model_filepath = ""
            session = make_session(onnx_path, options=options, providers=providers, provider_options=provider_options)
        feeds = _random_inputs(session, batch, input_shapes)
        # The unprofiled session's wall times scale the node times below. The two sessions take turns in
        # chunks of runs, so a stretch of background load on the host slows both alike instead of skewing the
        # scale, while each still runs back to back as a deployed session does (a pool's first run after
        # another session ran pays for waking its threads).
        plain = make_session(onnx_path, options=session_options(threads), providers=providers,
                             provider_options=provider_options)
        # Probes, timed in the same turns: a one-Identity model's run is what every session.run costs besides
        # its nodes (binding the feeds, allocating outputs, handing them to Python), which a cut model pays
        # twice; one Relu over 16 KB and one over 1 MB give the memory rate of a lone kernel, at which the
        # kernels a cut adds are costed (partitioning.planner, boundary terms).
        probes: dict[Any, tuple[Any, dict]] = {}
        for name, op, n in (("fixed", "Identity", 1), *((n, "Relu", n) for n in PROBE_ELEMENTS)):
            probe = make_session(one_op_model(op, [n]), options=session_options(threads), providers=providers,
                                 provider_options=provider_options)
            probes[name] = probe, {"x": np.zeros(n, np.float32)}
        if max_seconds is not None:  # the first run (a warm-up of its own, slower than the rest) sets the budget
            first = time.perf_counter()
            plain.run(None, feeds)
            turns = int(max_seconds / max(2 * (time.perf_counter() - first), 1e-9))
            if turns < warmup + repeats:
                warmup = min(warmup, 1 if turns < 20 else 2)
                repeats = min(repeats, max(MIN_REPEATS, turns - warmup))
        total_runs = 2 * (warmup + repeats)
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
            optimized, _ = read_graph(Path(tmp) / "optimized.onnx")
        except (OSError, ValueError):  # not every EP can save its graph; names alone still map most nodes
            optimized = []
        del session

    runs = kernel_runs(events)[warmup:]
    if len(runs) != repeats:
        raise RuntimeError(f"onnxruntime profile of {onnx_path} has {len(runs) + warmup} runs, expected "
                           f"{warmup + repeats}: cannot attribute node times")
    mapper = Attribution(nodes, initializers, optimized)
    mapper.pair_unnamed(runs[0])
    per_run = [mapper.attribute(run) for run in runs]
    per_node = {n.name: statistics.median(r[0].get(n.name, 0.0) for r in per_run) for n in nodes}
    unattributed = statistics.median(r[1] for r in per_run)
    reorder_out = reorder_out_ms(mapper, runs)

    node_sum = sum(per_node.values())
    cpu_shares = None
    if providers[0] != CPU_EP and node_sum <= unattributed:
        # The provider ran (most of) the graph as fused subgraphs, each one kernel to the profiler (OpenVINO,
        # TensorRT): the nodes' shares come from the CPU provider's profile, scaled below to this provider's time.
        cpu_shares = measure_node_costs(onnx_path, warmup=warmup, repeats=repeats, threads=threads, batch=batch,
                                        providers=[CPU_EP], input_shapes=input_shapes, min_seconds=0,
                                        max_seconds=max_seconds)
        per_node, reorder_out = dict(cpu_shares.per_node_ms), {}
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
    fitted = fit_throughput(runs) if cpu_shares is None else cpu_shares.fitted
    boundary = _boundary_rates(probe_ms, fitted, runs) if cpu_shares is None else cpu_shares.boundary
    host = host_facts(threads, providers)
    fused = sum(1 for v in per_node.values() if v == 0.0)
    source = (
        f"measured on this host ({host['machine']}, {host['platform']}, {threads or 'default'} threads, "
        f"{providers[0]}, onnxruntime {host['onnxruntime']}), median of {repeats} profiled runs after {warmup} "
        f"warm-up; unprofiled wall time the median of {len(walls)} runs over {span:.1f} s; "
        f"{fused} of {len(nodes)} nodes fused away or constant-folded (0 ms); overhead = median "
        f"session.run of a one-Identity model, {overhead * 1000:.1f} us"
        + (f"; {unattributed:.3f} ms of runtime-inserted nodes spread over the nodes by the scaling"
           if unattributed > 0 and cpu_shares is None else "")
        + (f"; {providers[0]} ran the graph as fused subgraphs that its profile cannot split by node "
           f"({unattributed:.3f} ms of kernel time in them), so the nodes' shares and the boundary rates are the "
           "CPU provider's profile's" if cpu_shares is not None else "")
        + scaled
        + ("; note: with a GPU execution provider the profiler times host-side kernel launches, so GPU "
           "execution time shows up in the overhead" if providers[0] in (CUDA_EP, TENSORRT_EP) else "")
    )
    return NodeCosts(per_node, overhead, "measured", source + _describe(boundary), fitted, boundary, reorder_out)


def _describe(rates: BoundaryRates | None) -> str:
    if rates is None:
        return ""
    return (f"; a cut adds kernels at {rates.launch_ms * 1000:.1f} us + bytes / {rates.gbps:.2f} GB/s each"
            + (" (the runtime reorders 4-D activations' layout)" if rates.reorders else ""))


def _boundary_rates(probe_ms: Mapping[Any, float], fit: Throughput | None,
                    runs: list[KernelRun]) -> BoundaryRates:
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
