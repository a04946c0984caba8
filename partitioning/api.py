"""`partitioning.profile(...)`: from a model to a plan (and a verified bundle), the engine of `split-profile`."""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from models.extras import require
from models.manifest import PLAN_SCHEMA
from partitioning.costs import MIN_SECONDS
from partitioning.planner import (PLAN_TABLE_MBPS, Budgets, CostInputs, Link, Plan, apply_measured, evaluate_cut,
                                  plan_cuts, rank)

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

# This host's power is unknown to us; these stand in for a small x86 box so that energy numbers are
# defined for --device local. Use a named device or a saved profile for real energy figures.
LOCAL_ACTIVE_W = 15.0
LOCAL_IDLE_W = 5.0
DEFAULT_CALIBRATION_SAMPLES = 16
DEFAULT_CHECK_SAMPLES = 32
DEFAULT_REFINE = 3
REFINE_ROUNDS = 5
REFINE_BOUND = 3  # at most REFINE_BOUND * refine candidates are timed, however the choice moves
# When the two best timed cuts are within REFINE_TIE of each other by the objective, or their timings rank them
# the other way round from the per-node model, they are timed again head to head: twice the runs, in turns of
# TIE_RUNS runs each (see _tie_break).
REFINE_TIE = 0.10
TIE_RUNS = 3
MAX_TIE_BREAKS = 2  # per refinement: a second only when the first handed the choice to a cut not yet timed


class NoFeasiblePlanError(RuntimeError):
    """No cut meets the budgets; `result` holds the plan with the closest candidate chosen."""

    def __init__(self, message: str, result: "ProfileResult"):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class ProfileResult:
    """The plan, its plan.json document, and where the bundle was written (if it was)."""

    plan: Plan
    document: Mapping[str, Any]
    bundle_dir: Path | None = None
    warnings: tuple[str, ...] = field(default=())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edge_costs(device: str, onnx_path: Path, model, sha: str, *, repeats: int, seconds: float,
                threads: int | None, progress: Progress, measured: dict) -> tuple[Any, dict[str, Any], float, float]:
    """Per-node edge costs, the device's plan.json record, and its active/idle power."""
    from partitioning import costs as cost_mod
    from partitioning.devices import DeviceProfile, resolve_device

    if device == "local":
        if threads not in measured:
            measured[threads] = _measure(onnx_path, repeats, seconds, threads, progress)
        nc = measured[threads]
        rec = {"name": "local", "kind": nc.kind, "source": nc.source, "host": _host(threads),
               "power": {"active_w": LOCAL_ACTIVE_W, "idle_w": LOCAL_IDLE_W,
                         "source": "assumed for a small x86 host; not measured"}}
        return nc, rec, LOCAL_ACTIVE_W, LOCAL_IDLE_W
    profile = resolve_device(device)
    if isinstance(profile, DeviceProfile):
        nc = cost_mod.estimate_node_costs(model, profile, precision="int8")
        rec = {"name": profile.name, "kind": nc.kind, "source": nc.source, "device_table": profile.source,
               "power": {"active_w": profile.active_w, "idle_w": profile.idle_w}}
        return nc, rec, profile.active_w, profile.idle_w
    nc = profile.costs_for(model, sha)
    active = float(getattr(profile, "active_w", None) or LOCAL_ACTIVE_W)
    idle = float(getattr(profile, "idle_w", None) or LOCAL_IDLE_W)
    rec = {"name": str(device), "kind": nc.kind, "source": nc.source,
           "power": {"active_w": active, "idle_w": idle}}
    return nc, rec, active, idle


def _cloud_costs(cloud: str, onnx_path: Path, model, *, repeats: int, seconds: float, threads: int | None,
                 progress: Progress, measured: dict) -> tuple[Any, dict[str, Any]]:
    from partitioning import costs as cost_mod
    from partitioning.devices import resolve_gpu

    if cloud == "local":
        if threads not in measured:  # the same host and threads as the edge: one measurement serves both
            measured[threads] = _measure(onnx_path, repeats, seconds, threads, progress)
        nc = measured[threads]
        return nc, {"name": "local", "kind": nc.kind, "source": nc.source}
    gpu = resolve_gpu(cloud)
    nc = cost_mod.estimate_node_costs(model, gpu, precision="fp32")
    return nc, {"name": gpu.name, "kind": nc.kind, "source": nc.source, "gpu_table": gpu.source}


def _measure(onnx_path: Path, repeats: int, seconds: float, threads: int | None, progress: Progress):
    from partitioning.costs import measure_node_costs

    progress(f"measuring per-node latency on this host ({repeats} runs after warm-up, over at least {seconds:g} s)")
    return measure_node_costs(onnx_path, repeats=repeats, threads=threads, min_seconds=seconds,
                              progress=lambda done, total: progress(f"  run {done}/{total}"))


def _refine(plan: Plan, graph, costs: CostInputs, proto, onnx_path: Path, inputs, *, count: int, repeats: int,
            seconds: float, edge_threads: int | None, cloud_threads: int | None,
            progress: Progress) -> tuple[Plan, dict[str, Any]]:
    """Time the `count` best candidates' real heads and tails and choose again, until the chosen one is timed;
    then settle a close or overturned pair head to head (_tie_break).

    The first round also times both baselines: each is one session of the full model, cheap to time, and the
    usual rival of a near-tie (a baseline predicted a little worse than the best cut is often measured better).
    A head-to-head that slows both its cuts can hand the choice to a cut that was never timed; that cut is then
    timed in turn and the pair settled again (at most MAX_TIE_BREAKS head-to-heads, REFINE_BOUND * count cuts).
    """
    from partitioning.refine import runs_per_round

    runs = runs_per_round(repeats, REFINE_ROUNDS) * REFINE_ROUNDS
    timed: list[str] = []
    ties: list[dict[str, Any]] = []
    timing = dict(repeats=repeats, seconds=seconds, edge_threads=edge_threads, cloud_threads=cloud_threads,
                  progress=progress)
    limit = REFINE_BOUND * count
    plan = _time_best(plan, graph, costs, proto, onnx_path, inputs, count=count, limit=limit, runs=runs, timed=timed,
                      **timing)
    while len(ties) < MAX_TIE_BREAKS:
        plan, tie = _tie_break(plan, graph, costs, proto, onnx_path, inputs, **timing)
        if tie is None:
            break
        ties.append(tie)
        if plan.best.measured or len(timed) >= limit:
            break
        progress(f"the head-to-head handed the choice to {plan.chosen}, which was not timed: timing it")
        plan = _time_best(plan, graph, costs, proto, onnx_path, inputs, count=1, limit=limit, runs=runs, timed=timed,
                          **timing)
    record = {"candidates": timed, "runs": runs, "rounds": REFINE_ROUNDS, "min_seconds": seconds,
              "edge_threads": edge_threads, "cloud_threads": cloud_threads, "chosen_timed": plan.best.measured,
              "tie_break": ties[-1] if ties else None}
    if len(ties) > 1:
        record["earlier_tie_breaks"] = ties[:-1]
    if not plan.best.measured:
        progress(f"the chosen cut {plan.chosen} was not timed ({len(timed)} cuts timed, at most "
                 f"{limit} for --refine {count}, and the choice moved with every timing)")
    return plan, record


def _time_best(plan: Plan, graph, costs: CostInputs, proto, onnx_path: Path, inputs, *, count: int, limit: int,
               runs: int, timed: list[str], repeats: int, seconds: float, edge_threads: int | None,
               cloud_threads: int | None, progress: Progress) -> Plan:
    """Time the `count` best untimed candidates (and, when nothing is timed yet, both baselines) and choose
    again, until the chosen one is timed or `limit` cuts are; appends the timed ids to `timed`. `runs` (the
    least runs per cut, from repeats) is for the progress line."""
    from partitioning.planner import CLOUD_ONLY, EDGE_ONLY
    from partitioning.refine import time_cuts

    while len(timed) < limit:
        todo = [c for c in rank(plan.candidates, plan.budgets) if not c.measured]
        todo = todo[: min(count, limit - len(timed))]
        if not timed:
            todo += [c for c in plan.candidates if c.id in (EDGE_ONLY, CLOUD_ONLY) and c not in todo]
        if not todo:
            break
        again = " more" if timed else ""
        progress(f"timing the {len(todo)}{again} best cuts as extracted head+tail ({', '.join(c.id for c in todo)}; "
                 f"at least {runs} runs each in {REFINE_ROUNDS} or more interleaved rounds over {seconds:g} s)")
        times = time_cuts(proto, onnx_path, inputs, todo, edge_threads=edge_threads, cloud_threads=cloud_threads,
                          repeats=repeats, rounds=REFINE_ROUNDS, min_seconds=seconds)
        before = plan.chosen
        plan = apply_measured(plan, graph, costs, times)
        timed += [c.id for c in todo]
        for c in todo:
            got = plan.candidate(c.id)
            progress(f"  {c.id}: predicted {got.predicted_edge_ms:.3f} + {got.predicted_cloud_ms:.3f} ms, "
                     f"timed {got.edge_ms:.3f} + {got.cloud_ms:.3f} ms")
        if plan.chosen != before:
            progress(f"timing moved the choice from {before} to {plan.chosen}")
        if plan.best.measured:
            break
    return plan


def _tie_break(plan: Plan, graph, costs: CostInputs, proto, onnx_path: Path, inputs, *, repeats: int,
               seconds: float, edge_threads: int | None, cloud_threads: int | None,
               progress: Progress) -> tuple[Plan, dict[str, Any] | None]:
    """Time the two best timed cuts again, head to head, when they are within REFINE_TIE by the objective or
    when their timings overturn the per-node model's order.

    The refinement's rounds are a few seconds long, and a busy or virtualized host's speed drifts over such
    spans (5-13% on the 2-core development VM, README), so two cuts timed a few percent apart may come out in
    either order, and a stretch that slows one side's threads more than the other's can even reverse two cuts
    the model holds 15% apart. Here the two alone take 2 x repeats runs each (more, until the turns span
    2 x seconds), TIE_RUNS at a time in alternating turns, so that a drift reaches both alike; their timings
    replace the refinement's. None when there is no such pair (or the objective is bytes, which timing does not
    change).
    """
    from partitioning.refine import time_cuts

    ranked = [c for c in rank(plan.candidates, plan.budgets) if c.measured and c.feasible]
    if plan.budgets.objective == "bytes" or len(ranked) < 2:
        return plan, None
    first, second = ranked[:2]
    objective = plan.budgets.objective
    a, b = (c.objective_value(objective) for c in (first, second))
    predicted = {c.id: evaluate_cut(graph, c.edge_nodes, costs, plan.link, plan.budgets, c.id)
                 .objective_value(objective) for c in (first, second)}
    if a <= 0:
        return plan, None
    if (b - a) / a <= REFINE_TIE:
        reason = f"within {100 * REFINE_TIE:g}%"
        progress(f"{first.id} and {second.id} are within {100 * (b - a) / a:.1f}%: timing them head to head")
    elif predicted[first.id] > predicted[second.id]:
        reason = "timing overturned the prediction"
        progress(f"timed, {first.id} is {100 * (b - a) / a:.1f}% better than {second.id}, but the per-node model put "
                 f"{second.id} {100 * (predicted[first.id] / predicted[second.id] - 1):.1f}% ahead: timing them head "
                 f"to head")
    else:
        return plan, None
    runs = 2 * repeats
    turns = max(1, runs // TIE_RUNS)
    progress(f"  (at least {runs} runs each in turns of {TIE_RUNS}, over {2 * seconds:g} s)")
    times = time_cuts(proto, onnx_path, inputs, [first, second], edge_threads=edge_threads,
                      cloud_threads=cloud_threads, repeats=runs, rounds=turns, seed=1, min_seconds=2 * seconds)
    before = plan.chosen
    plan = apply_measured(plan, graph, costs, times)
    for c in (first, second):
        got = plan.candidate(c.id)
        progress(f"  {c.id}: timed {got.edge_ms:.3f} + {got.cloud_ms:.3f} ms")
    if plan.chosen != before:
        progress(f"the head-to-head moved the choice from {before} to {plan.chosen}")
    return plan, {"candidates": [first.id, second.id], "reason": reason, "runs": runs, "rounds": turns,
                  "min_seconds": 2 * seconds, "before": {first.id: round(a, 4), second.id: round(b, 4)},
                  "predicted": {cid: round(v, 4) for cid, v in predicted.items()}}


def _host(threads: int | None = None) -> dict[str, Any]:
    from partitioning.costs import host_facts

    return host_facts(threads)


def profile(
    model: str | Path,
    *,
    device: str = "local",
    cloud: str = "local",
    network: str | None = "wifi",
    uplink_mbps: float | None = None,
    downlink_mbps: float | None = None,
    rtt_ms: float | None = None,
    max_latency_ms: float | None = None,
    edge_memory_mb: float | None = None,
    max_energy_mj: float | None = None,
    objective: str = "latency",
    codec: str = "int8",
    out: str | Path | None = None,
    calibration: str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    allow_pickle: bool = False,
    save_device_profile: str | Path | None = None,
    repeats: int = 20,
    measure_seconds: float = MIN_SECONDS,
    threads: int | None = None,
    cloud_threads: int | None = None,
    plan_table_mbps: tuple[float, ...] = PLAN_TABLE_MBPS,
    refine: int = DEFAULT_REFINE,
    progress: Progress | None = None,
) -> ProfileResult:
    """Load `model`, cost every cut for device/cloud/network, choose under the budgets, write the bundle to `out`.

    With device and cloud both "local", the `refine` best candidates are then timed as real head and tail
    (more when the choice moves to one not yet timed) and the choice is made again with those times. Every
    measurement on this host (each side's profile, each refinement timing) spans at least `measure_seconds`.
    """
    from models.loaders import load_model
    from partitioning.graph import build_cut_graph

    onnx = require("onnx", "profile")
    if refine < 0:
        raise ValueError(f"refine must be >= 0 (candidates to time; 0 disables), got {refine}")
    if not measure_seconds >= 0:
        raise ValueError(f"measure_seconds must be >= 0, got {measure_seconds}")
    say: Progress = progress or (lambda msg: None)
    notes: list[str] = []
    budgets = Budgets(max_latency_ms, edge_memory_mb, max_energy_mj, objective)
    from partitioning.devices import network_from_args

    net = network_from_args(network, uplink_mbps, downlink_mbps, rtt_ms)
    link = Link(net.uplink_mbps, net.downlink_mbps, net.rtt_ms, net.tx_nj_per_byte)

    with tempfile.TemporaryDirectory(prefix="splitinfer-") as tmp:
        say(f"loading {model}")
        loaded = load_model(str(model), Path(tmp), input_shape=input_shape, allow_pickle=allow_pickle, progress=say)
        proto = onnx.load(str(loaded.onnx_path))
        onnx_sha = _sha256(loaded.onnx_path)
        say(f"analysing the graph ({len(proto.graph.node)} nodes)")
        graph = build_cut_graph(proto)
        measured: dict = {}
        edge_nc, device_rec, active_w, idle_w = _edge_costs(
            device, loaded.onnx_path, proto, onnx_sha, repeats=repeats, seconds=measure_seconds, threads=threads,
            progress=say, measured=measured)
        if save_device_profile is not None:
            if edge_nc.kind != "measured":
                raise ValueError("--save-device-profile needs --device local (a measurement on this host)")
            from partitioning.costs import save_device_profile as save

            save(Path(save_device_profile), edge_nc, model_sha256=onnx_sha, host=_host(threads))
            say(f"saved the device profile to {save_device_profile}")
        cloud_nc, cloud_rec = _cloud_costs(cloud, loaded.onnx_path, proto, repeats=repeats, seconds=measure_seconds,
                                           threads=threads if cloud_threads is None else cloud_threads,
                                           progress=say, measured=measured)
        costs = CostInputs(
            edge_ms=dict(edge_nc.per_node_ms), cloud_ms=dict(cloud_nc.per_node_ms),
            edge_overhead_ms=edge_nc.overhead_ms, cloud_overhead_ms=cloud_nc.overhead_ms,
            edge_boundary=edge_nc.boundary, cloud_boundary=cloud_nc.boundary,
            cloud_reorder_out_ms=dict(cloud_nc.reorder_out_ms),
            edge_active_w=active_w, edge_idle_w=idle_w, codec=codec,
        )
        say(f"searching cuts over {len(graph.nodes)} nodes")
        plan = plan_cuts(graph, costs, link, budgets, plan_table_mbps)
        if device != "local" or cloud != "local":
            refined: dict[str, Any] = {"candidates": [], "reason": "edge and cloud are not both measured on this host"}
        elif refine == 0:
            refined = {"candidates": [], "reason": "refine 0"}
        else:
            plan, refined = _refine(plan, graph, costs, proto, loaded.onnx_path, loaded.inputs, count=refine,
                                    repeats=repeats, seconds=measure_seconds, edge_threads=threads,
                                    cloud_threads=threads if cloud_threads is None else cloud_threads, progress=say)
        document = _document(loaded, onnx_sha, graph, plan, device_rec, cloud_rec, net, budgets, codec)
        document["refined"] = refined
        result = ProfileResult(plan, document, None, tuple(notes))
        if not plan.feasible:
            raise NoFeasiblePlanError(plan.explain_infeasible(), result)
        if out is None:
            return result

        from partitioning.bundle import write_bundle
        from partitioning.quantize import load_calibration, synthetic_samples

        if calibration is not None:
            calib = load_calibration(Path(calibration), loaded.inputs)
            checks = calib[-DEFAULT_CHECK_SAMPLES:]
        else:
            msg = ("no --calibration data: the int8 heads are calibrated on synthetic (random normal) inputs; "
                   "their accuracy on real data may be lower than verification reports")
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
            calib = synthetic_samples(loaded.inputs, DEFAULT_CALIBRATION_SAMPLES, seed=1)
            checks = synthetic_samples(loaded.inputs, DEFAULT_CHECK_SAMPLES, seed=2)
        document["calibration"] = {"source": str(calibration) if calibration else "synthetic", "samples": len(calib)}
        final = write_bundle(Path(out), proto, loaded.onnx_path, graph, plan, document, calib, checks, loaded.task,
                             progress=say)
        return ProfileResult(plan, final, Path(out), tuple(notes))


def _document(loaded, onnx_sha: str, graph, plan: Plan, device_rec: dict, cloud_rec: dict, net, budgets: Budgets,
              codec: str) -> dict[str, Any]:
    """The plan.json document (artifacts and verification are added when the bundle is written)."""
    return {
        "schema": PLAN_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "generator": "splitinfer 0.1.0",
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            "format": loaded.format,
            "sha256": loaded.sha256,
            "onnx_sha256": onnx_sha,
            "task": loaded.task,
            "inputs": [s.to_json() for s in loaded.inputs],
            "outputs": [s.to_json() for s in loaded.outputs],
            "nodes": len(graph.nodes),
        },
        "device": device_rec,
        "cloud": cloud_rec,
        "network": {"name": net.name, "uplink_mbps": net.uplink_mbps, "downlink_mbps": net.downlink_mbps,
                    "rtt_ms": net.rtt_ms, "tx_nj_per_byte": net.tx_nj_per_byte, "source": net.source},
        "budgets": {"max_latency_ms": budgets.max_latency_ms, "edge_memory_mb": budgets.edge_memory_mb,
                    "max_energy_mj": budgets.max_energy_mj, "objective": budgets.objective},
        "codec": codec,
        "candidates": [c.to_json() for c in plan.candidates],
        "chosen": plan.chosen,
        "feasible": plan.feasible,
        "plan_table": [{"uplink_mbps": m, "cut": cid} for m, cid in plan.plan_table],
    }
