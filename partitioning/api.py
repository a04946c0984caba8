"""`partitioning.profile(...)`: from a model to a plan (and a verified bundle), the engine of `split-profile`."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from models.extras import require
from models.manifest import (
    BudgetsRecord,
    Calibration,
    ModelRecord,
    NetworkRecord,
    PlanDocument,
    Power,
    Refinement,
    SideRecord,
    sha256_file,
)
from models.plandoc import UncostedNodes
from partitioning.costtypes import NodeCosts
from partitioning.options import ProfileOptions
from partitioning.planner import CostInputs, Link, Plan, SearchProgress, plan_cuts
from partitioning.refine import Refiner, RefineTarget

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

# This host's power is unknown to us; these stand in for a small x86 box so that energy numbers are
# defined for --device local. Use a named device or a saved profile for real energy figures.
LOCAL_ACTIVE_W = 15.0
LOCAL_IDLE_W = 5.0
DEFAULT_CALIBRATION_SAMPLES = 16
DEFAULT_CHECK_SAMPLES = 32
GENERATOR = "splitinfer 0.1.0"


class NoFeasiblePlanError(RuntimeError):
    """No cut meets the budgets; `result` holds the plan with the closest candidate chosen."""

    def __init__(self, message: str, result: ProfileResult):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class ProfileResult:
    """The plan, its typed plan.json document, and where the bundle was written (if it was)."""

    plan: Plan
    plan_document: PlanDocument
    bundle_dir: Path | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def document(self) -> dict[str, Any]:
        """plan.json as a JSON object."""
        return self.plan_document.to_json()


class _Measurements:
    """Costs measured on this host, once per thread count: edge and cloud at the same threads share one."""

    def __init__(self, onnx_path: Path, opts: ProfileOptions, progress: Progress) -> None:
        self.onnx_path, self.opts, self.progress = onnx_path, opts, progress
        self.done: dict[tuple[int | None, tuple[str, ...] | None], NodeCosts] = {}

    def at(self, threads: int | None, providers: tuple[str, ...] | None = None) -> NodeCosts:
        """The measurement at `threads` intra-op threads on `providers` (None: the default ones)."""
        from partitioning.costs import measure_node_costs

        key = (threads, providers)
        if key not in self.done:
            repeats, seconds, say = self.opts.repeats, self.opts.measure_seconds, self.progress
            on = f" on {', '.join(providers)}" if providers else ""
            budget = self.opts.measure_budget or None
            say(f"measuring per-node latency on this host{on} ({repeats} runs after warm-up"
                + (f", fewer when they would take over {budget:g} s" if budget else "")
                + f", over at least {seconds:g} s)")
            self.done[key] = measure_node_costs(self.onnx_path, repeats=repeats, threads=threads,
                                                min_seconds=seconds, providers=providers, max_seconds=budget,
                                                provider_options=self.opts.provider_options if providers else None,
                                                progress=lambda done, total: say(f"  run {done}/{total}"))
        return self.done[key]


def _edge_costs(device: str, model: Any, sha: str, threads: int | None,
                measured: _Measurements) -> tuple[NodeCosts, SideRecord, float, float]:
    """Per-node edge costs, the device's plan.json record, and its active/idle power."""
    from partitioning.costs import host_facts
    from partitioning.device_profile import resolve_device
    from partitioning.devices import DeviceProfile
    from partitioning.estimate import estimate_node_costs

    if device == "local":
        providers = measured.opts.providers
        nc = measured.at(threads, providers)
        power = Power(LOCAL_ACTIVE_W, LOCAL_IDLE_W, "assumed for a small x86 host; not measured")
        host = host_facts(threads, providers)
        if measured.opts.edge_runtime == "litert":
            from partitioning.tflite import litert_host, litert_profile

            nc = litert_profile(measured.onnx_path, model, nc, measured.opts, measured.progress)
            host = litert_host(host)
        record = SideRecord("local", nc.kind, nc.source, host=host, power=power, runtime=host["runtime"],
                            providers=tuple(host.get("providers") or ()) or None)
        return nc, record, LOCAL_ACTIVE_W, LOCAL_IDLE_W
    profile = resolve_device(device)
    if isinstance(profile, DeviceProfile):
        nc = estimate_node_costs(model, profile, precision="int8")
        record = SideRecord(profile.name, nc.kind, nc.source, device_table=profile.source,
                            power=Power(profile.active_w, profile.idle_w), runtime=profile.runtime,
                            providers=profile.providers if profile.runtime == "onnxruntime" else None)
        return nc, record, profile.active_w, profile.idle_w
    nc = profile.costs_for(model, sha)
    active = float(profile.active_w or LOCAL_ACTIVE_W)
    idle = float(profile.idle_w or LOCAL_IDLE_W)
    measured_on = profile.host
    saved_providers = measured_on.get("providers")
    record = SideRecord(str(device), nc.kind, nc.source, power=Power(active, idle),
                        runtime=str(measured_on.get("runtime", "onnxruntime")),
                        providers=tuple(saved_providers) if isinstance(saved_providers, list) else None)
    return nc, record, active, idle


def _cloud_costs(cloud: str, model: Any, threads: int | None, measured: _Measurements) -> tuple[NodeCosts, SideRecord]:
    """Per-node cloud costs and the cloud's plan.json record."""
    from partitioning.devices import resolve_gpu
    from partitioning.estimate import estimate_node_costs

    if cloud == "local":  # the same host and threads as the edge: one measurement serves both
        nc = measured.at(threads)
        return nc, SideRecord("local", nc.kind, nc.source)
    gpu = resolve_gpu(cloud)
    nc = estimate_node_costs(model, gpu, precision="fp32")
    return nc, SideRecord(gpu.name, nc.kind, nc.source, gpu_table=gpu.source)


def profile(model: str | Path, options: ProfileOptions | None = None, *, progress: Progress | None = None,
            refiner: Refiner | None = None, **overrides: Any) -> ProfileResult:
    """Load `model`, cost every cut for device/cloud/network, choose under the budgets, write the bundle to `out`.

    Settings come from `options` (default ProfileOptions()) with `overrides` (its field names) on top, so
    `profile("resnet18", device="rpi4", network="4g", out="b/")` works. With device and cloud both "local", the
    `refine` best candidates are then timed as real head and tail by `refiner` (default Refiner()): more when
    the choice moves to one not yet timed, and the choice is made again with those times. Every measurement on
    this host (each side's profile, each refinement timing) spans at least `measure_seconds`.
    """
    from models.loaders import load_model
    from partitioning.devices import network_from_args
    from partitioning.graph import build_cut_graph

    opts = replace(options or ProfileOptions(), **overrides)
    onnx = require("onnx", "profile")
    say: Progress = progress or (lambda msg: None)
    notes: list[str] = []
    budgets = opts.budgets
    net = network_from_args(opts.network, opts.uplink_mbps, opts.downlink_mbps, opts.rtt_ms)
    link = Link(net.uplink_mbps, net.downlink_mbps, net.rtt_ms, net.tx_nj_per_byte)

    with tempfile.TemporaryDirectory(prefix="splitinfer-") as tmp:
        say(f"loading {model}")
        loaded = load_model(str(model), Path(tmp), input_shape=opts.input_shape, allow_pickle=opts.allow_pickle,
                            progress=say, input_hints=opts.input_hints, name=opts.name)
        proto = onnx.load(str(loaded.onnx_path))
        onnx_sha = sha256_file(loaded.onnx_path)
        say(f"analysing the graph ({len(proto.graph.node)} nodes)")
        graph = build_cut_graph(proto)
        measured = _Measurements(loaded.onnx_path, opts, say)
        edge_nc, device_rec, active_w, idle_w = _edge_costs(opts.device, proto, onnx_sha, opts.threads, measured)
        samples = _samples(opts, loaded, proto)
        codec_profile = _measure_codecs(opts, proto, graph, samples[0], say)
        if opts.save_device_profile is not None:
            _save_profile(Path(opts.save_device_profile), edge_nc, onnx_sha, opts.threads, opts.providers,
                          opts.edge_runtime, codec_profile)
            say(f"saved the device profile to {opts.save_device_profile}")
        cloud_nc, cloud_rec = _cloud_costs(opts.cloud, proto, opts.cloud_measure_threads, measured)
        if opts.edge_runtime == "litert" and device_rec.runtime != "litert":
            msg = (f"the edge costs assume {device_rec.runtime or 'onnxruntime'} ({opts.device}), not LiteRT, which "
                   "the bundle's .tflite heads run on; for LiteRT costs measure on the device: split-profile full.onnx "
                   "--device local --edge-runtime litert --save-device-profile dev.json")
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
        costs = CostInputs(
            edge_ms=dict(edge_nc.per_node_ms), cloud_ms=dict(cloud_nc.per_node_ms),
            edge_overhead_ms=edge_nc.overhead_ms, cloud_overhead_ms=cloud_nc.overhead_ms,
            edge_boundary=edge_nc.boundary, cloud_boundary=cloud_nc.boundary,
            cloud_reorder_out_ms=dict(cloud_nc.reorder_out_ms),
            edge_active_w=active_w, edge_idle_w=idle_w, codec=opts.codec.split("+", 1)[0] if opts.codec != "auto"
            else "int8",
            codecs=_codec_costs(opts, codec_profile, edge_nc, measured),
        )
        uncosted = _uncosted(graph, proto, (edge_nc, cloud_nc))
        if uncosted is not None and uncosted.count:
            msg = _uncosted_warning(uncosted, graph)
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
        say(f"searching cuts over {len(graph.nodes)} nodes")
        plan = plan_cuts(graph, costs, link, budgets, opts.plan_table_mbps, progress=_every_second(say))
        if not opts.both_local:
            refined = Refinement.skipped("edge and cloud are not both measured on this host")
        elif opts.refine == 0:
            refined = Refinement.skipped("refine 0")
        elif opts.edge_runtime == "litert":
            refined = Refinement.skipped("the edge is measured on LiteRT; refinement times real heads and tails on "
                                         "onnxruntime only")
        elif opts.providers and tuple(opts.providers) != ("CPUExecutionProvider",):
            refined = Refinement.skipped(f"the edge is measured on {', '.join(opts.providers)}; refinement times "
                                         "real heads and tails on the default providers only")
        else:
            target = RefineTarget(graph, costs, proto, loaded.onnx_path, loaded.inputs, opts.repeats,
                                  opts.measure_seconds, opts.threads, opts.cloud_measure_threads, say)
            plan, refined = (refiner or Refiner()).refine(plan, target, opts.refine)
        plan, costs = _gate_codecs(plan, graph, costs, proto, samples, loaded.task, say)
        model_rec = ModelRecord(loaded.name, loaded.source, loaded.format, loaded.sha256, onnx_sha, loaded.task,
                                loaded.inputs, loaded.outputs, len(graph.nodes), uncosted, loaded.postprocess)
        codec = plan.best.codec or (opts.codec if opts.codec != "auto" else "int8")
        document = plan_document(plan, model_rec, device_rec, cloud_rec, net, codec, refined)
        result = ProfileResult(plan, document, None, tuple(notes))
        if not plan.feasible:
            raise NoFeasiblePlanError(plan.explain_infeasible(), result)
        if opts.out is None:
            return result
        fp32_edge = _fp32_edge_ms(opts.device, proto, edge_nc)
        return _export(opts, loaded, proto, graph, plan, document, notes, say, (costs, fp32_edge), samples)


UNCOSTED_EXAMPLES = 5


def _uncosted(graph: Any, proto: Any, sides: tuple[NodeCosts, ...]) -> UncostedNodes | None:
    """The graph's nodes that an estimated side costed without knowing their work; None when no side estimates."""
    from partitioning.estimate import uncosted_nodes
    from partitioning.flops import node_stats, runtime_free_nodes

    estimated = [nc for nc in sides if nc.kind == "estimated"]
    if not estimated:
        return None
    names: set[str] = set()
    for nc in estimated:
        if nc.uncosted is None:  # e.g. a saved profile's fitted rates: check the shapes here
            nc = replace(nc, uncosted=uncosted_nodes(node_stats(proto), runtime_free_nodes(proto)))
        names.update(nc.uncosted or ())
    found = [v for v in graph.nodes if v in names]
    return UncostedNodes(len(found), tuple(found[:UNCOSTED_EXAMPLES]))


def _uncosted_warning(uncosted: UncostedNodes, graph: Any) -> str:
    """One line: how many nodes were costed blind, a few of them, and what to do."""
    examples = ", ".join(f"{v} ({graph.node_ops.get(v, '?')})" for v in uncosted.examples)
    more = ", ..." if uncosted.count > len(uncosted.examples) else ""
    return (f"{uncosted.count} of {len(graph.nodes)} nodes have shapes that shape inference could not determine, "
            f"so their estimated time leaves out their work (e.g. {examples}{more}); the plan underestimates them. "
            "An ONNX or .pt2 export with static shapes avoids this")


def _every_second(say: Progress, interval_s: float = 1.0) -> SearchProgress:
    """A planner progress callback that says how far the search is at most once per `interval_s`."""
    import time

    last = [time.monotonic()]

    def report(what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= interval_s:
            last[0] = now
            say(f"  searching cuts: {what} {done}/{total}")

    return report


def _save_profile(path: Path, costs: NodeCosts, sha: str, threads: int | None,
                  providers: tuple[str, ...] | None = None, runtime: str = "onnxruntime", codecs: Any = None) -> None:
    from partitioning.costs import host_facts
    from partitioning.device_profile import save_device_profile

    if costs.kind != "measured":
        raise ValueError("--save-device-profile needs --device local (a measurement on this host)")
    host = host_facts(threads, providers)
    if runtime == "litert":
        from partitioning.tflite import litert_host

        host = litert_host(host)
    save_device_profile(path, costs, model_sha256=sha, host=host, codecs=None if codecs is None else codecs.to_json())


def _fp32_edge_ms(device: str, model: Any, planned: NodeCosts) -> dict[str, float]:
    """The edge's per-node times at fp32 (a head that fails its int8 gate runs float): estimated from the device
    table at fp32, or the planned times where they were measured (a measurement runs the fp32 model)."""
    from partitioning.device_profile import resolve_device
    from partitioning.devices import DeviceProfile
    from partitioning.estimate import estimate_node_costs

    profile = None if device == "local" else resolve_device(device)
    if isinstance(profile, DeviceProfile):
        return dict(estimate_node_costs(model, profile, precision="fp32").per_node_ms)
    return dict(planned.per_node_ms)


CODEC_SAMPLES = 8  # inputs the codec accuracy gate runs (partitioning.codecs)


def _samples(opts: ProfileOptions, loaded: Any, proto: Any) -> list[dict[str, Any]]:
    """Inputs for the codec measurements: the calibration folder's first ones, else synthetic (seeded)."""
    from models.convert import integer_input_highs
    from models.inputs import synthetic_samples
    from partitioning.quantize import load_calibration

    if opts.calibration is not None:
        return load_calibration(Path(opts.calibration), loaded.inputs)[:CODEC_SAMPLES]
    highs = integer_input_highs(proto, opts.int_high)
    return synthetic_samples(loaded.inputs, CODEC_SAMPLES, seed=3, int_high=highs)


def _codec_specs(opts: ProfileOptions) -> tuple[str, ...]:
    from partitioning.planner import CODEC_SPECS

    return CODEC_SPECS if opts.codec == "auto" else (opts.codec,)


def _measure_codecs(opts: ProfileOptions, proto: Any, graph: Any, sample: dict[str, Any], say: Progress) -> Any:
    """Every codec timed on this host on the model's own activations for `sample` (partitioning.codecs)."""
    from partitioning.codecs import measure_codecs
    from partitioning.graph import activations

    say("measuring the activation codecs on the model's tensors")
    arrays = activations(proto, list(graph.tensors), feeds=dict(sample))
    return measure_codecs({k: v for k, v in arrays.items() if k in graph.tensors}, _codec_specs(opts))


def _codec_costs(opts: ProfileOptions, profile: Any, edge: NodeCosts, measured: _Measurements) -> Any:
    """The planner's codec inputs: the device's encode rates (measured there, or this host's scaled by the
    memory rates), the cloud's decode rates (this host's), the measured ratios."""
    from partitioning.codecs import codec_costs, device_scale
    from partitioning.device_profile import resolve_device

    if opts.device == "local":
        return codec_costs(profile)
    saved = resolve_device(opts.device)
    encode = getattr(saved, "codec_encode", None)
    here = next(iter(measured.done.values()), None)  # this host's own probes, when it was measured
    host_gbps = here.boundary.gbps if here is not None and here.boundary is not None else profile.memory_gbps
    scale = device_scale(host_gbps, edge.boundary.gbps if edge.boundary is not None else None)
    return codec_costs(profile, edge_scale=scale, encode=encode)


def _gate_codecs(plan: Plan, graph: Any, costs: CostInputs, proto: Any, samples: list[dict[str, Any]], task: str,
                 say: Progress) -> tuple[Plan, CostInputs]:
    """The plan with the lossy codecs that fail the accuracy gate on its exported cuts dropped, and the costs with
    those rejections."""
    from partitioning.codecs import CodecGate, gate_plan
    from partitioning.quantize import gated_agreement

    if costs.codecs is None:
        return plan, costs
    say("checking the lossy codecs' accuracy on the exported cuts")
    gate = CodecGate(proto, samples, task, gated_agreement)
    try:
        return gate_plan(plan, graph, costs, gate)
    finally:
        gate.close()


def _export(opts: ProfileOptions, loaded: Any, proto: Any, graph: Any, plan: Plan, document: PlanDocument,
            notes: list[str], say: Progress, costing: tuple[CostInputs, dict[str, float]],
            samples: list[dict[str, Any]]) -> ProfileResult:
    """Calibrate, write and verify the bundle in `opts.out`; cost again the heads that fell back from int8 and
    choose again with those costs (the lossy codecs of the cuts the choice moves to are checked on `samples`)."""
    from models.convert import integer_input_highs
    from models.inputs import synthetic_samples
    from partitioning.bundle import HeadCosting, fallback_warnings, write_bundle
    from partitioning.quantize import QuantConfig, load_calibration

    assert opts.out is not None
    if opts.calibration is not None:
        calib = load_calibration(Path(opts.calibration), loaded.inputs)
        checks = calib[-DEFAULT_CHECK_SAMPLES:]
    else:
        msg = ("no --calibration data: the int8 heads are calibrated on synthetic (random normal) inputs; "
               "their accuracy on real data may be lower than verification reports")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
        highs = integer_input_highs(proto, opts.int_high)  # token ids below the vocabulary, masks 0/1
        calib = synthetic_samples(loaded.inputs, DEFAULT_CALIBRATION_SAMPLES, seed=1, int_high=highs)
        checks = synthetic_samples(loaded.inputs, DEFAULT_CHECK_SAMPLES, seed=2, int_high=highs)
    source = str(opts.calibration) if opts.calibration else "synthetic"
    document = replace(document, calibration=Calibration(source, len(calib)))
    def regate(moved: Plan, costs: CostInputs) -> tuple[Plan, CostInputs]:
        return _gate_codecs(moved, graph, costs, proto, samples, loaded.task, say)

    final = write_bundle(Path(opts.out), proto, loaded.onnx_path, graph, plan, document, calib, checks, loaded.task,
                         QuantConfig(calibration=opts.calibration_method), progress=say,
                         costing=HeadCosting(*costing, regate=regate))
    for msg in fallback_warnings(final):
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    if opts.edge_runtime == "litert":  # head.tflite + head.int8.tflite per cut, on the same samples
        from partitioning.tflite import add_tflite_heads, ensure_converter

        env = ensure_converter(Path(opts.converter_env) if opts.converter_env else None, opts.converter_python,
                               progress=say)
        final = PlanDocument.from_json(add_tflite_heads(Path(opts.out), env.convert, progress=say))
    return ProfileResult(plan, final, Path(opts.out), tuple(notes))


def plan_document(plan: Plan, model: ModelRecord, device: SideRecord, cloud: SideRecord, net: Any, codec: str,
                  refined: Refinement) -> PlanDocument:
    """The plan.json document (artifacts and verification are added when the bundle is written)."""
    from partitioning.bundle import plan_fields

    return PlanDocument(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        generator=GENERATOR,
        model=model,
        device=device,
        cloud=cloud,
        network=NetworkRecord(net.name, net.uplink_mbps, net.downlink_mbps, net.rtt_ms, net.tx_nj_per_byte,
                              net.source),
        budgets=BudgetsRecord(**dataclasses.asdict(plan.budgets)),  # the record, not the planner's checked subclass
        refined=refined,
        **{**plan_fields(plan, codec), "codec": codec},
    )
