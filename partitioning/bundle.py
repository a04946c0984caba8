"""Writing a split bundle: full model, head/int8 head/tail per cut of the plan table, each verified."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import (
    CLOUD_ONLY,
    EDGE_ONLY,
    PLAN_FILE,
    ArtifactEntry,
    Artifacts,
    CutFiles,
    CutVerification,
    PlanDocument,
    PlanRow,
    TensorSpec,
    Verification,
)
from partitioning.extract import SplitMismatchError, Splitter, run_split, session, verify_split
from partitioning.graph import CutGraph
from partitioning.planner import Candidate, CostInputs, HeadAt, Plan, apply_measured, evaluate_cut
from partitioning.quantize import ActivationRanges, QuantConfig, gated_agreement, quantize_gated

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


def cut_tensor_specs(graph: CutGraph, cut: Sequence[str]) -> list[TensorSpec]:
    """Cut tensors with the batch dimension dynamic (every tensor here carries batch on axis 0 at batch 1)."""
    specs = []
    for name in cut:
        info = graph.tensors[name]
        shape = (None, *info.shape[1:]) if info.shape and info.shape[0] == 1 else info.shape
        specs.append(TensorSpec(name, tuple(shape), info.dtype))
    return specs


SPLIT_CHECK_SAMPLES = 8  # head then tail against the model: a wiring check, exact up to float rounding


class _Exporter:
    """What every cut of one bundle shares, made once: the full model's session and outputs on the check samples,
    its shapes (`Splitter`) and its activation ranges per calibration method (`ActivationRanges`)."""

    def __init__(self, out: Path, model, full_path: Path, graph: CutGraph, cut_ids: Sequence[str], plan: Plan,
                 calib: Sequence[dict[str, np.ndarray]], checks: Sequence[dict[str, np.ndarray]], task: str,
                 qconfig: QuantConfig, work: Path) -> None:
        self.out, self.model, self.full_path, self.graph = out, model, full_path, graph
        self.calib, self.checks, self.task, self.qconfig = calib, checks, task, qconfig
        self.full = session(full_path)
        self.reference = [self.full.run(None, dict(x)) for x in checks]
        io = [i.name for i in model.graph.input] + [o.name for o in model.graph.output]
        self.splitter = Splitter(model, [*io, *(t for cid in cut_ids for t in plan.candidate(cid).cut)])
        self.ranges = ActivationRanges(full_path, calib, work)
        self.seed: tuple[str, tuple[str, ...]] | None = None  # the whole-model head's (method, float nodes)

    def write(self, cut_id: str, cut: Sequence[str], prefix: str) -> tuple[CutFiles, CutVerification]:
        """Extract, quantize and verify one cut; return its files and its verification."""
        out, checks = self.out, self.checks
        tensors = tuple(cut_tensor_specs(self.graph, cut))
        if cut_id == CLOUD_ONLY:
            files = CutFiles(tensors, None, None, ArtifactEntry.of(out, self.full_path))
            return files, CutVerification({"max_abs_error": 0.0, "passed": True,
                                           "note": "no head: the tail is full.onnx"})
        (out / prefix).mkdir(parents=True, exist_ok=True)
        head_int8 = out / prefix / "head.int8.onnx"
        if cut_id == EDGE_ONLY:
            head, tail, tail_sess = self.full_path, None, None
            split = {"max_abs_error": 0.0, "passed": True, "note": "no tail: the head is full.onnx"}
        else:
            head, tail = self.splitter.split(cut, out / prefix / "head.onnx", out / prefix / "tail.onnx")
            tail_sess = session(tail)
            check = verify_split(self.full, session(head), tail_sess, checks[:SPLIT_CHECK_SAMPLES],
                                 reference=self.reference[:SPLIT_CHECK_SAMPLES])
            if not check.passed:
                raise SplitMismatchError(
                    f"cut {cut_id}: head then tail differs from the model by {check.max_abs_error:.3g} "
                    f"(tolerance {check.tolerance:.3g})"
                )
            split = check.to_json()

        def gate(candidate: Path) -> Mapping[str, Any]:
            q_head = session(candidate)
            return gated_agreement(self.reference, lambda i: run_split(q_head, tail_sess, checks[i]), self.task,
                                   self.qconfig)

        result = quantize_gated(head, head_int8, self.calib, gate, self.qconfig, ranges=self.ranges, seed=self.seed)
        if cut_id == EDGE_ONLY and result.precision == "mixed":  # the later heads try these float nodes first
            self.seed = (result.calibration, result.float_nodes)
        files = CutFiles(tensors, ArtifactEntry.of(out, head), ArtifactEntry.of(out, head_int8),
                         ArtifactEntry.of(out, tail) if tail else None)
        return files, CutVerification(split, result.record())


REPICK_ROUNDS = 3  # times the choice is made again after the heads it moved to were exported


def exported_cuts(plan: Plan) -> list[str]:
    """The cuts a bundle holds for `plan`: the chosen one, each plan-table row's, edge-only and cloud-only."""
    wanted = [plan.chosen] + [cid for _, cid in plan.plan_table] + [EDGE_ONLY, CLOUD_ONLY]
    return list(dict.fromkeys(c for c in wanted if any(k.id == c for k in plan.candidates)))


def write_bundle(
    out: Path,
    model,
    source_onnx: Path,
    graph: CutGraph,
    plan: Plan,
    document: PlanDocument,
    calib: Sequence[dict[str, np.ndarray]],
    checks: Sequence[dict[str, np.ndarray]],
    task: str,
    qconfig: QuantConfig = QuantConfig(),
    progress: Progress = lambda msg: None,
    costing: HeadCosting | None = None,
) -> PlanDocument:
    """Write the bundle for `plan` into `out` and return the finished plan.json document.

    With `costing`, the heads that run at another precision than planned (mixed or fp32 after their gate) are
    costed at that precision, and the cut and the plan table are chosen again with those costs (`rechoose`); a
    cut the choice moves to is exported (and gated) in turn, at most REPICK_ROUNDS times.
    """
    out.mkdir(parents=True, exist_ok=True)
    full_path = out / "full.onnx"
    shutil.copyfile(source_onnx, full_path)
    cuts: dict[str, CutFiles] = {}
    verification: dict[str, CutVerification] = {}
    with tempfile.TemporaryDirectory(prefix="splitinfer-bundle-") as work:
        # every candidate's cut is prepared for: the choice made again may move to any of them
        exporter = _Exporter(out, model, full_path, graph, [c.id for c in plan.candidates], plan, calib, checks,
                             task, qconfig, Path(work))
        root_used = False  # the first chosen cut's files sit at the bundle's root
        for rounds in range(REPICK_ROUNDS + 1):
            # the whole model's head first: when it needs nodes in float, the smaller heads try those first
            todo = sorted((cid for cid in exported_cuts(plan) if cid not in cuts), key=lambda c: c != EDGE_ONLY)
            for i, cut_id in enumerate(todo, 1):
                progress(f"exporting cut {cut_id} ({i}/{len(todo)}): extract, quantize int8 (gated), verify")
                prefix = f"cuts/{cut_id}"
                if cut_id == plan.chosen and not root_used:
                    prefix, root_used = ".", True
                cuts[cut_id], verification[cut_id] = exporter.write(cut_id, plan.candidate(cut_id).cut, prefix)
            if costing is None:
                break
            moved = rechoose(plan, graph, costing, verification)
            new = [cid for cid in exported_cuts(moved) if cid not in cuts]
            if not new:
                plan = moved
                break
            if rounds == REPICK_ROUNDS:  # still moving: keep the last choice, with every exported head recosted
                log.warning("the choice still moved after %d rounds of exporting the heads it moved to; kept %s",
                            REPICK_ROUNDS, plan.chosen)
                plan = replace(plan, candidates=moved.candidates, feasible=moved.candidate(plan.chosen).feasible)
                break
            progress(f"heads that fell back from int8 are costed at the precision they run: the choice moved "
                     f"from {plan.chosen} to {moved.chosen}; exporting {', '.join(new)}")
            plan = moved
        log.info("activation ranges: %d calibration(s), reused by %d head quantization(s)",
                 exporter.ranges.computed, exporter.ranges.reused)
    chosen = cuts[plan.chosen]
    artifacts = Artifacts(ArtifactEntry.of(out, full_path), cuts, chosen.head, chosen.head_int8, chosen.tail)
    document = replace(document, **plan_fields(plan, document.codec), artifacts=artifacts,
                       verification=Verification(len(checks), len(calib), verification))
    (out / PLAN_FILE).write_text(json.dumps(document.to_json(), indent=2) + "\n")
    return document


def plan_fields(plan: Plan, codec: str) -> dict[str, Any]:
    """The plan.json fields that come from the plan: candidates, the chosen cut, feasibility, the plan table
    (each row's cut with its codec at that rate) and the chosen cut's codec (`codec` when it sends nothing)."""
    table_codecs = plan.table_codecs
    if len(table_codecs) != len(plan.plan_table):  # a table set by hand: each row's cut with its candidate's codec
        table_codecs = tuple(plan.candidate(cid).codec for _, cid in plan.plan_table)
    return {"candidates": tuple(c.record() for c in plan.candidates), "chosen": plan.chosen,
            "feasible": plan.feasible, "codec": plan.best.codec or codec,
            "plan_table": tuple(PlanRow(m, cid, c) for (m, cid), c in zip(plan.plan_table, table_codecs))}


@dataclass(frozen=True)
class HeadCosting:
    """What costing a head again at the precision it runs takes: the planner's inputs (heads planned at
    `costs.head_precision`, int8; with the codec gate's rejections) and the edge's per-node times at fp32 (the
    same times where the edge was measured: a measurement runs the fp32 model). `regate`: checks the lossy
    codecs of a plan's exported cuts again after the choice moved (`codecs.gate_plan`)."""

    costs: CostInputs
    fp32_edge_ms: Mapping[str, float]
    regate: Callable[[Plan, CostInputs], tuple[Plan, CostInputs]] | None = None


def _heads(plan: Plan, verification: Mapping[str, CutVerification], costing: HeadCosting) -> dict[str, HeadAt]:
    """The heads that run at another precision than int8, as the planner costs them: each exported head as its gate
    left it, and each head not exported yet with the nodes that an exported head had to keep in float (the most
    sensitive nodes stay so in any head: their ranges are the whole model's), until it is exported and gated."""
    heads = {cid: HeadAt(check.precision, frozenset(check.float_nodes), costing.fp32_edge_ms)
             for cid, check in verification.items() if check.precision in ("mixed", "fp32")}
    floats = {v for cid, check in verification.items() if check.precision == "mixed" for v in check.float_nodes}
    for cand in plan.candidates:
        if cand.id not in verification and cand.edge_nodes and floats:
            kept = frozenset(v for v in floats if v in cand.edge_nodes)
            if kept:
                heads[cand.id] = HeadAt("mixed", kept, costing.fp32_edge_ms)
    return heads


def rechoose(plan: Plan, graph: CutGraph, costing: HeadCosting, verification: Mapping[str, CutVerification]) -> Plan:
    """`plan` with the heads that fell back from int8 costed at the precision they run (`_heads`), the cut and the
    plan table chosen again with those costs (timed candidates keep their timings), and the lossy codecs of the
    cuts it moved to checked (`costing.regate`)."""
    heads = _heads(plan, verification, costing)
    if not heads or costing.costs.head_precision != "int8":
        return plan
    costs = replace(costing.costs, heads={**costing.costs.heads, **heads})
    plan = apply_measured(plan, graph, costs, {})
    if costing.regate is not None:
        plan, _ = costing.regate(plan, costs)
    return plan


def recost_head(graph: CutGraph, plan: Plan, cut_id: str, precision: str, float_nodes: Sequence[str],
                costing: HeadCosting) -> Candidate:
    """Candidate `cut_id` with its head at `precision`: "mixed" takes the fp32 time and fp32 weight bytes of
    `float_nodes` and the planned (int8) ones of the rest, "fp32" those of every head node. A timed candidate
    (refinement) keeps its timed compute; only its memory follows the precision."""
    cand = plan.candidate(cut_id)
    costs = costing.costs
    if precision == "int8" or not cand.edge_nodes or costs.head_precision != "int8":
        return cand
    at = replace(costs, heads={cut_id: HeadAt(precision, frozenset(float_nodes), costing.fp32_edge_ms)})
    measured = (cand.edge_ms, cand.cloud_ms) if cand.measured else None
    return evaluate_cut(graph, cand.edge_nodes, at, plan.link, plan.budgets, cut_id, measured)


def fallback_warnings(document: PlanDocument) -> list[str]:
    """One line per exported head whose int8 version failed its gate: what it runs at instead, and why."""
    checks = document.verification.cuts if document.verification else {}
    return [line for cut_id, check in checks.items() if (line := fallback_line(cut_id, check)) is not None]


def fallback_line(cut_id: str, check: CutVerification) -> str | None:
    """The warning for one head that does not run plain int8 (None for one that does, or has no head)."""
    gate = check.int8 or {}
    if check.precision not in ("mixed", "fp32"):
        return None
    tries = [a for a in gate.get("attempts", ()) if not a.get("float_nodes") and "value" in a]
    floats = len(check.float_nodes)
    metric, value = gate.get("metric"), float(gate.get("value", 0.0))
    if not tries:  # only seeded tries with float nodes ran (the plain one failed to calibrate)
        return (f"cut {cut_id}: it runs {'mixed precision' if check.precision == 'mixed' else 'the fp32 head'} "
                f"with the {floats} node(s) in float that another head of this model needed ({metric} {value:.3f}; "
                f"its plain int8 head was not tried); its edge time is costed at that precision")
    best = max((float(a["value"]) for a in tries), default=value)
    if metric == "relative_error":
        best = min((float(a["value"]) for a in tries), default=value)
    stopped = " on the samples run before it could not pass" if any(a.get("stopped_after") for a in tries) else ""
    broken = [str(a["calibration"]) for a in gate.get("attempts", ()) if "error" in a]
    failed = (f"its int8 head failed the gate ({metric} {best:.3f}{stopped}, threshold {gate.get('threshold')}, "
              f"calibration tried: {', '.join(dict.fromkeys(str(a['calibration']) for a in tries)) or '-'}"
              + (f"; {', '.join(dict.fromkeys(broken))} could not calibrate" if broken else "") + ")")
    largest = max((int(a.get("float_nodes") or 0) for a in gate.get("attempts", ())), default=0)
    if check.precision == "mixed":
        return (f"cut {cut_id}: {failed}; it runs mixed precision with {floats} node(s) kept in float "
                f"({metric} {value:.3f}); its edge time is costed at that precision")
    if gate.get("passed"):
        return (f"cut {cut_id}: {failed}; it passed only with every quantized node kept in float ({floats}), so it "
                "runs the fp32 head; its edge time is costed at fp32")
    return (f"cut {cut_id}: {failed}, even with {largest} of its {floats} quantized node(s) kept in float; it "
            "runs the fp32 head; its edge time is costed at fp32")
