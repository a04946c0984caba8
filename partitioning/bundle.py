"""Writing a split bundle: full model, head/int8 head/tail per cut of the plan table, each verified."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

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
    quantize_head(head, head_int8, calib, qconfig)
    q_head, tail_sess = session(head_int8), (session(tail) if tail else None)
    quantized = [run_split(q_head, tail_sess, x) for x in checks]
    files = CutFiles(tensors, ArtifactEntry.of(out, head), ArtifactEntry.of(out, head_int8),
                     ArtifactEntry.of(out, tail) if tail else None)
    return files, CutVerification(split, int8_agreement(reference, quantized, task, qconfig))


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
) -> PlanDocument:
    """Write the bundle for `plan` into `out` and return the finished plan.json document."""
    out.mkdir(parents=True, exist_ok=True)
    full_path = out / "full.onnx"
    shutil.copyfile(source_onnx, full_path)
    wanted = [plan.chosen] + [cid for _, cid in plan.plan_table] + [EDGE_ONLY, CLOUD_ONLY]
    cut_ids = list(dict.fromkeys(wanted))
    cuts: dict[str, CutFiles] = {}
    verification: dict[str, CutVerification] = {}
    for i, cut_id in enumerate(cut_ids, 1):
        progress(f"exporting cut {cut_id} ({i}/{len(cut_ids)}): extract, quantize int8, verify")
        prefix = "." if cut_id == plan.chosen else f"cuts/{cut_id}"
        cut = plan.candidate(cut_id).cut
        cuts[cut_id], verification[cut_id] = _write_cut(
            out, model, full_path, graph, cut_id, cut, prefix, calib, checks, task, qconfig
        )
    chosen = cuts[plan.chosen]
    artifacts = Artifacts(ArtifactEntry.of(out, full_path), cuts, chosen.head, chosen.head_int8, chosen.tail)
    document = replace(document, artifacts=artifacts,
                       verification=Verification(len(checks), len(calib), verification))
    (out / PLAN_FILE).write_text(json.dumps(document.to_json(), indent=2) + "\n")
    return document
