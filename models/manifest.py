"""The split bundle: `plan.json` plus the ONNX files it names, read the same way by edge and cloud.

A bundle directory holds (schema `splitinfer.plan/v1`):

    plan.json            model, device, network, budgets, candidates, chosen, plan_table,
                         artifacts (file + sha256 of everything below), verification
    full.onnx            the whole model (fp32), the edge's last resort and the cloud-only tail
    head.onnx            head of the chosen cut (fp32)
    head.int8.onnx       the same head, static int8 (QDQ)
    head.tflite          optional (`--edge-runtime litert`): the same head for LiteRT, fp32; head.int8.tflite:
                         full-integer int8; both keep the ONNX names and layout at their inputs and outputs
    tail.onnx            tail of the chosen cut; its inputs are named as the cut tensors
    cuts/<id>/...        head.onnx, head.int8.onnx, tail.onnx for the other cuts of the plan table

`artifacts.cuts[<id>]` says, per cut, which files are its head, int8 head and tail and what tensors cross
the cut (`tensors`: name, shape with None for the batch dimension, dtype). The baselines: `edge-only`
(head = the full model, no tail; its tensors are the model outputs) and `cloud-only` (no head, tail =
`full.onnx`; its tensors are the model inputs).

Only the standard library is used here (and `models.plandoc`, the typed plan.json): the edge agent reads
bundles without torch or onnx. The plan document's names are re-exported from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.plandoc import (
    BASELINES,
    CLOUD_ONLY,
    CODECS,
    EDGE_ONLY,
    OBJECTIVE_FIELDS,
    OBJECTIVES,
    PLAN_FILE,
    PLAN_SCHEMA,
    ArtifactEntry,
    Artifacts,
    BudgetsRecord,
    BundleError,
    Calibration,
    CandidateRecord,
    CutFiles,
    CutVerification,
    ModelRecord,
    NetworkRecord,
    PlanDocument,
    PlanRow,
    Postprocess,
    Power,
    Rankable,
    Refinement,
    SideRecord,
    TensorSpec,
    TieBreak,
    Verification,
    rank_key,
    sha256_file,
    split_codec_spec,
)

__all__ = ["PLAN_SCHEMA", "PLAN_FILE", "EDGE_ONLY", "CLOUD_ONLY", "BASELINES", "CODECS", "OBJECTIVES",
           "OBJECTIVE_FIELDS", "Rankable", "rank_key", "BundleError", "TensorSpec", "sha256_file", "ModelRecord",
           "Power", "SideRecord", "NetworkRecord", "BudgetsRecord", "CandidateRecord", "PlanRow", "TieBreak",
           "Refinement", "Calibration", "ArtifactEntry", "CutFiles", "Artifacts", "CutVerification", "Verification",
           "PlanDocument", "Postprocess", "CutArtifacts", "artifact_entry", "inside_bundle", "Bundle"]


@dataclass(frozen=True)
class CutArtifacts:
    """The files and cut tensors of one cut of a bundle."""

    id: str
    tensors: tuple[TensorSpec, ...]
    head: Path | None
    head_int8: Path | None
    tail: Path | None
    int8_passed: bool
    head_tflite: Path | None = None
    int8_precision: str = "int8"  # what head_int8 runs at when it passed: "int8" or "mixed" (some nodes in float)
    head_int8_tflite: Path | None = None
    tflite_int8_passed: bool = False

    @property
    def edge_head(self) -> Path | None:
        """The head the edge runs by default: int8 when it passed its accuracy gate, else fp32."""
        if self.head_int8 is not None and self.int8_passed:
            return self.head_int8
        return self.head

    @property
    def edge_head_tflite(self) -> Path | None:
        """The head a LiteRT device runs by default: the int8 .tflite when it passed its gate, else the fp32 one."""
        if self.head_int8_tflite is not None and self.tflite_int8_passed:
            return self.head_int8_tflite
        return self.head_tflite


def artifact_entry(root: Path, path: Path) -> dict[str, str]:
    """The plan.json entry {file, sha256} for a file inside bundle `root`."""
    return ArtifactEntry.of(root, path).to_json()


class Bundle:
    """A split bundle on disk, checked against its plan.json when loaded."""

    def __init__(self, root: Path, plan: dict[str, Any]):
        self.root = root
        self.plan = plan  # plan.json as read (bundles made by hand may hold only what the agent needs)
        self.artifacts = Artifacts.from_json(plan["artifacts"])
        post = plan.get("model", {}).get("postprocess")
        self.postprocess = None if post is None else Postprocess.from_json(post)  # decoding after the tail
        if self.postprocess is not None:
            self.postprocess.check_outputs(t.name for t in self.outputs)

    @property
    def document(self) -> PlanDocument:
        """plan.json typed, as split-profile writes it (BundleError for a bundle made another way)."""
        return PlanDocument.from_json(self.plan)

    @classmethod
    def load(cls, path: str | Path, verify_hashes: bool = True) -> Bundle:
        """Read `path/plan.json`, check its schema, and (by default) every artifact's sha256."""
        root = Path(path)
        plan_path = root / PLAN_FILE
        if not root.is_dir():
            raise BundleError(f"{root}: not a bundle directory (expected a directory with {PLAN_FILE})")
        if not plan_path.is_file():
            raise BundleError(f"{root}: no {PLAN_FILE}; make a bundle with `split-profile MODEL --out {root}`")
        if plan_path.is_symlink():
            raise BundleError(f"{plan_path}: is a symbolic link; {PLAN_FILE} must be a regular file in the bundle")
        try:
            plan = json.loads(plan_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{plan_path}: not valid JSON ({exc})") from exc
        if not isinstance(plan, dict) or plan.get("schema") != PLAN_SCHEMA:
            got = plan.get("schema") if isinstance(plan, dict) else type(plan).__name__
            raise BundleError(f"{plan_path}: schema is {got!r}, expected {PLAN_SCHEMA!r}")
        for key in ("model", "chosen", "candidates", "artifacts"):
            if key not in plan:
                raise BundleError(f"{plan_path}: missing key {key!r}")
        try:
            bundle = cls(root, plan)
        except BundleError as exc:
            raise BundleError(f"{plan_path}: {exc}") from exc
        for entry in bundle._all_entries():
            file = bundle._resolve(entry)
            if verify_hashes and sha256_file(file) != entry.sha256:
                raise BundleError(f"{file}: sha256 does not match {PLAN_FILE}; the bundle was modified or truncated")
        if bundle.chosen not in bundle.cut_ids:
            raise BundleError(f"{plan_path}: chosen cut {bundle.chosen!r} has no artifacts")
        return bundle

    # -- plan accessors -------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The model's name as the cloud tier serves it."""
        return str(self.plan["model"]["name"])

    @property
    def model_sha256(self) -> str:
        """The model's identity on the wire: plan.json model.onnx_sha256 (the converted graph's hash), else the
        source's sha256, else full.onnx's. With a cut id it names one tail, whatever the model is called."""
        model = self.plan["model"]
        return str(model.get("onnx_sha256") or model.get("sha256") or self.artifacts.full.sha256)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs."""
        return tuple(TensorSpec.from_json(t, "model.inputs") for t in self.plan["model"]["inputs"])

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The model's outputs."""
        return tuple(TensorSpec.from_json(t, "model.outputs") for t in self.plan["model"]["outputs"])

    @property
    def chosen(self) -> str:
        """Id of the cut the planner chose."""
        return str(self.plan["chosen"])

    @property
    def full(self) -> Path:
        """The full fp32 model."""
        return self._resolve(self.artifacts.full)

    @property
    def cut_ids(self) -> tuple[str, ...]:
        """Ids of every cut that has artifacts in this bundle."""
        return tuple(self.artifacts.cuts)

    def cut(self, cut_id: str) -> CutArtifacts:
        """The artifacts of cut `cut_id`; BundleError naming the known ids if absent."""
        cuts = self.artifacts.cuts
        if cut_id not in cuts:
            raise BundleError(f"{self.root}: no cut {cut_id!r}; this bundle has {sorted(cuts)}")
        files = cuts[cut_id]
        checked = self.plan.get("verification", {}).get("cuts", {}).get(cut_id, {})
        gate = checked.get("int8", {})
        tflite_gate = (checked.get("litert") or {}).get("int8") or {}
        return CutArtifacts(
            id=cut_id,
            tensors=files.tensors,
            head=self._resolve(files.head) if files.head else None,
            head_int8=self._resolve(files.head_int8) if files.head_int8 else None,
            tail=self._resolve(files.tail) if files.tail else None,
            # a head whose gate passed only with every quantized node in float is the fp32 head ("fp32")
            int8_passed=bool(gate.get("passed", False)) and gate.get("precision") != "fp32",
            int8_precision=str(gate.get("precision") or ("int8" if gate.get("passed") else "fp32")),
            head_tflite=self._resolve(files.head_tflite) if files.head_tflite else None,
            head_int8_tflite=self._resolve(files.head_int8_tflite) if files.head_int8_tflite else None,
            tflite_int8_passed=bool(tflite_gate.get("passed", False)),
        )

    def candidate(self, cut_id: str) -> dict[str, Any]:
        """The planner's candidate record (costs, feasibility) for `cut_id`."""
        for cand in self.plan["candidates"]:
            if cand["id"] == cut_id:
                return cand
        raise BundleError(f"{self.root}: no candidate {cut_id!r}")

    @property
    def plan_table(self) -> tuple[tuple[float, str], ...]:
        """(uplink Mbps, best cut id) rows, ascending in bandwidth."""
        rows = [PlanRow.from_json(r) for r in self.plan.get("plan_table") or ()] or [PlanRow(0.0, self.chosen)]
        return tuple(sorted((r.uplink_mbps, r.cut) for r in rows))

    def codec_for(self, cut_id: str, uplink_mbps: float | None = None) -> str | None:
        """The plan's codec for `cut_id`: at `uplink_mbps`, the plan-table row's when that row names this cut,
        else the candidate's; None when the plan has none (a plan.json older than the codec choice)."""
        if uplink_mbps is not None:
            rows = sorted((PlanRow.from_json(r) for r in self.plan.get("plan_table") or ()),
                          key=lambda r: r.uplink_mbps)
            row = next((r for r in reversed(rows) if r.uplink_mbps <= uplink_mbps), rows[0] if rows else None)
            if row is not None and row.cut == cut_id and row.codec is not None:
                return row.codec
        cands = self.plan.get("candidates") or ()
        cand = next((c for c in cands if isinstance(c, dict) and c.get("id") == cut_id), None)
        codec = None if cand is None else cand.get("codec")
        return str(codec) if split_codec_spec(codec) is not None else None

    def best_cut_for(self, uplink_mbps: float) -> str:
        """The plan table's cut for a measured uplink: the row with the largest bandwidth not above it."""
        best = self.plan_table[0][1]
        for mbps, cut_id in self.plan_table:
            if mbps <= uplink_mbps:
                best = cut_id
        return best

    # -- helpers --------------------------------------------------------------------------------

    def _all_entries(self) -> list[ArtifactEntry]:
        entries = [self.artifacts.full]
        for cut in self.artifacts.cuts.values():
            entries.extend(cut.entries)
        return entries

    def _resolve(self, entry: ArtifactEntry) -> Path:
        return inside_bundle(self.root, entry.file)


def inside_bundle(root: Path, file: str) -> Path:
    """The regular file `file` (relative) inside bundle `root`; BundleError if it is absolute, climbs out with
    `..`, is or passes through a symlink, resolves outside the bundle directory, or is missing.

    Edge and cloud both load bundles through here, so neither follows a link to a file the bundle's hashes do
    not describe the place of (the bundle directory itself may be reached through a link).
    """
    rel = Path(file)
    if rel.is_absolute() or ".." in rel.parts:
        raise BundleError(f"{root}: artifact path {file!r} leaves the bundle directory")
    path = root
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{path}: is a symbolic link; bundle files must be regular files inside the bundle "
                              "(copy the file in instead of linking it)")
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise BundleError(f"{path}: listed in {PLAN_FILE} but missing") from None
    if not real.is_relative_to(root.resolve()):
        raise BundleError(f"{path}: resolves to {real}, outside the bundle directory {root.resolve()}")
    if not real.is_file():
        raise BundleError(f"{path}: listed in {PLAN_FILE} but missing (not a regular file)")
    return path
