"""Writing a split bundle: full model, head/int8 head/tail per cut of the plan table, each verified."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from models.manifest import CLOUD_ONLY, EDGE_ONLY, PLAN_FILE, PLAN_SCHEMA, TensorSpec, artifact_entry
from partitioning.extract import SplitMismatchError, extract_split, run_split, session, verify_split
from partitioning.graph import CutGraph
from partitioning.planner import Plan
from partitioning.quantize import QuantConfig, int8_agreement, quantize_head

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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Extract, quantize and verify one cut; return its artifacts entry and its verification entry."""
    full = session(full_path)
    reference = [full.run(None, dict(x)) for x in checks]
    entry: dict[str, Any] = {"tensors": [s.to_json() for s in cut_tensor_specs(graph, cut)]}
    if cut_id == CLOUD_ONLY:
        entry.update(head=None, head_int8=None, tail=artifact_entry(out, full_path))
        return entry, {"split": {"max_abs_error": 0.0, "passed": True, "note": "no head: the tail is full.onnx"}}
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
    quantize_head(head, head_int8, calib, qconfig)
    q_head, tail_sess = session(head_int8), (session(tail) if tail else None)
    quantized = [run_split(q_head, tail_sess, x) for x in checks]
    entry.update(
        head=artifact_entry(out, head),
        head_int8=artifact_entry(out, head_int8),
        tail=artifact_entry(out, tail) if tail else None,
    )
    return entry, {"split": split, "int8": int8_agreement(reference, quantized, task, qconfig)}


def write_bundle(
    out: Path,
    model,
    source_onnx: Path,
    graph: CutGraph,
    plan: Plan,
    document: dict[str, Any],
    calib: Sequence[dict[str, np.ndarray]],
    checks: Sequence[dict[str, np.ndarray]],
    task: str,
    qconfig: QuantConfig = QuantConfig(),
    progress: Progress = lambda msg: None,
) -> dict[str, Any]:
    """Write the bundle for `plan` into `out` and return the finished plan.json document."""
    out.mkdir(parents=True, exist_ok=True)
    full_path = out / "full.onnx"
    shutil.copyfile(source_onnx, full_path)
    wanted = [plan.chosen] + [cid for _, cid in plan.plan_table] + [EDGE_ONLY, CLOUD_ONLY]
    cut_ids = list(dict.fromkeys(wanted))
    cuts, verification = {}, {}
    for i, cut_id in enumerate(cut_ids, 1):
        progress(f"exporting cut {cut_id} ({i}/{len(cut_ids)}): extract, quantize int8, verify")
        prefix = "." if cut_id == plan.chosen else f"cuts/{cut_id}"
        cut = plan.candidate(cut_id).cut
        cuts[cut_id], verification[cut_id] = _write_cut(
            out, model, full_path, graph, cut_id, cut, prefix, calib, checks, task, qconfig
        )
    chosen = cuts[plan.chosen]
    document = dict(document)
    document["schema"] = PLAN_SCHEMA
    document["artifacts"] = {
        "full": artifact_entry(out, full_path),
        "head": chosen["head"],
        "head_int8": chosen["head_int8"],
        "tail": chosen["tail"],
        "cuts": cuts,
    }
    document["verification"] = {
        "samples": len(checks),
        "calibration_samples": len(calib),
        "cuts": verification,
        "passed": all(v["split"]["passed"] for v in verification.values()),
    }
    (out / PLAN_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return document
