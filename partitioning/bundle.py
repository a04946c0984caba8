"""Writing a split bundle: full model, head/int8 head/tail per cut of the plan table, each verified."""

from __future__ import annotations

import json
import logging
import shutil
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
    TensorSpec,
    Verification,
)
from partitioning.extract import SplitMismatchError, extract_split, run_split, session, verify_split
from partitioning.graph import CutGraph
from partitioning.planner import Candidate, CostInputs, Plan, _violations, evaluate_cut
from partitioning.quantize import QuantConfig, int8_agreement, quantize_gated

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


def _write_cut(
    out: Path,
    model,
    full_path: Path,
    graph: CutGraph,
    cut_id: str,
    cut: Sequence[str],
    prefix: str,
    calib: Sequence[dict[str, np.ndarray]],
    checks: Sequence[dict[str, np.ndarray]],
    task: str,
    qconfig: QuantConfig,
) -> tuple[CutFiles, CutVerification]:
    """Extract, quantize and verify one cut; return its files and its verification."""
    full = session(full_path)
    reference = [full.run(None, dict(x)) for x in checks]
    tensors = tuple(cut_tensor_specs(graph, cut))
    if cut_id == CLOUD_ONLY:
        files = CutFiles(tensors, None, None, ArtifactEntry.of(out, full_path))
        return files, CutVerification({"max_abs_error": 0.0, "passed": True, "note": "no head: the tail is full.onnx"})
    (out / prefix).mkdir(parents=True, exist_ok=True)
    head_int8 = out / prefix / "head.int8.onnx"
    if cut_id == EDGE_ONLY:
        head, tail = full_path, None
        split = {"max_abs_error": 0.0, "passed": True, "note": "no tail: the head is full.onnx"}
    else:
        head, tail = extract_split(model, cut, out / prefix / "head.onnx", out / prefix / "tail.onnx")
        check = verify_split(full, session(head), session(tail), checks)
        if not check.passed:
            raise SplitMismatchError(
                f"cut {cut_id}: head then tail differs from the model by {check.max_abs_error:.3g} "
                f"(tolerance {check.tolerance:.3g})"
            )
        split = check.to_json()
    tail_sess = session(tail) if tail else None

    def gate(candidate: Path) -> Mapping[str, Any]:
        q_head = session(candidate)
        return int8_agreement(reference, [run_split(q_head, tail_sess, x) for x in checks], task, qconfig)

    result = quantize_gated(head, head_int8, calib, gate, qconfig)
    files = CutFiles(tensors, ArtifactEntry.of(out, head), ArtifactEntry.of(out, head_int8),
                     ArtifactEntry.of(out, tail) if tail else None)
    return files, CutVerification(split, result.record())


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

    With `costing`, the candidates whose head runs at another precision than planned (mixed or fp32 after
    its gate) are costed again at that precision (`recost_head`).
    """
    out.mkdir(parents=True, exist_ok=True)
    full_path = out / "full.onnx"
    shutil.copyfile(source_onnx, full_path)
    wanted = [plan.chosen] + [cid for _, cid in plan.plan_table] + [EDGE_ONLY, CLOUD_ONLY]
    cut_ids = list(dict.fromkeys(wanted))
    cuts: dict[str, CutFiles] = {}
    verification: dict[str, CutVerification] = {}
    for i, cut_id in enumerate(cut_ids, 1):
        progress(f"exporting cut {cut_id} ({i}/{len(cut_ids)}): extract, quantize int8 (gated), verify")
        prefix = "." if cut_id == plan.chosen else f"cuts/{cut_id}"
        cut = plan.candidate(cut_id).cut
        cuts[cut_id], verification[cut_id] = _write_cut(
            out, model, full_path, graph, cut_id, cut, prefix, calib, checks, task, qconfig
        )
    chosen = cuts[plan.chosen]
    artifacts = Artifacts(ArtifactEntry.of(out, full_path), cuts, chosen.head, chosen.head_int8, chosen.tail)
    document = replace(document, artifacts=artifacts,
                       verification=Verification(len(checks), len(calib), verification))
    if costing is not None:
        records = {c.id: c for c in document.candidates}
        for cut_id, check in verification.items():
            if check.precision in ("mixed", "fp32") and cut_id in records:
                records[cut_id] = recost_head(graph, plan, cut_id, check.precision, check.float_nodes,
                                              costing).record()
        document = replace(document, candidates=tuple(records[c.id] for c in document.candidates))
    (out / PLAN_FILE).write_text(json.dumps(document.to_json(), indent=2) + "\n")
    return document


@dataclass(frozen=True)
class HeadCosting:
    """What costing a head again at the precision it runs takes: the planner's inputs (heads planned at
    `costs.head_precision`, int8) and the edge's per-node times at fp32 (the same times where the edge was
    measured: a measurement runs the fp32 model)."""

    costs: CostInputs
    fp32_edge_ms: Mapping[str, float]


def recost_head(graph: CutGraph, plan: Plan, cut_id: str, precision: str, float_nodes: Sequence[str],
                costing: HeadCosting) -> Candidate:
    """Candidate `cut_id` with its head at `precision`: "mixed" takes the fp32 time and fp32 weight bytes of
    `float_nodes` and the planned (int8) ones of the rest, "fp32" those of every head node. A timed candidate
    (refinement) keeps its timed compute; only its memory follows the precision."""
    cand = plan.candidate(cut_id)
    costs = costing.costs
    if precision == "int8" or not cand.edge_nodes or costs.head_precision != "int8":
        return cand
    floats = cand.edge_nodes if precision == "fp32" else frozenset(float_nodes) & cand.edge_nodes
    edge_ms = {**costs.edge_ms, **{v: costing.fp32_edge_ms.get(v, costs.edge_ms.get(v, 0.0)) for v in floats}}
    at = replace(costs, edge_ms=edge_ms, head_precision="fp32" if precision == "fp32" else costs.head_precision)
    measured = (cand.edge_ms, cand.cloud_ms) if cand.measured else None
    new = evaluate_cut(graph, cand.edge_nodes, at, plan.link, plan.budgets, cut_id, measured)
    if precision == "mixed":  # the float nodes' weights stay fp32: 4 bytes a weight, not 1
        memory = new.edge_memory_bytes + sum(graph.node_weight_bytes.get(v, 0) for v in floats) * 3 // 4
        violations = _violations(new.total_ms, memory, new.energy_mj, plan.budgets)
        new = replace(new, edge_memory_bytes=memory, feasible=not violations, violations=violations)
    return new


def fallback_warnings(document: PlanDocument) -> list[str]:
    """One line per exported head whose int8 version failed its gate: what it runs at instead, and why."""
    lines = []
    checks = document.verification.cuts if document.verification else {}
    for cut_id, check in checks.items():
        gate = check.int8 or {}
        if check.precision not in ("mixed", "fp32"):
            continue
        tries = [a for a in gate.get("attempts", ()) if not a.get("float_nodes")]
        best = max((float(a["value"]) for a in tries), default=float(gate.get("value", 0.0)))
        if gate.get("metric") == "relative_error":
            best = min((float(a["value"]) for a in tries), default=float(gate.get("value", 0.0)))
        failed = (f"its int8 head failed the gate ({gate.get('metric')} {best:.3f}, "
                  f"threshold {gate.get('threshold')}, calibration tried: "
                  f"{', '.join(dict.fromkeys(str(a['calibration']) for a in tries)) or '-'})")
        if check.precision == "mixed":
            lines.append(f"cut {cut_id}: {failed}; it runs mixed precision with {len(check.float_nodes)} "
                         f"node(s) kept in float ({gate.get('metric')} {float(gate['value']):.3f}); "
                         "its edge time is costed at that precision")
        else:
            lines.append(f"cut {cut_id}: {failed}, even with {len(check.float_nodes)} node(s) kept in float; "
                         "it runs the fp32 head; its edge time is costed at fp32")
    return lines
