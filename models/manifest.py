"""The split bundle: `plan.json` plus the ONNX files it names, read the same way by edge and cloud.

A bundle directory holds (schema `splitinfer.plan/v1`):

    plan.json            model, device, network, budgets, candidates, chosen, plan_table,
                         artifacts (file + sha256 of everything below), verification
    full.onnx            the whole model (fp32), the edge's last resort and the cloud-only tail
    head.onnx            head of the chosen cut (fp32)
    head.int8.onnx       the same head, static int8 (QDQ)
    tail.onnx            tail of the chosen cut; its inputs are named as the cut tensors
    cuts/<id>/...        head.onnx, head.int8.onnx, tail.onnx for the other cuts of the plan table

`artifacts.cuts[<id>]` says, per cut, which files are its head, int8 head and tail and what tensors cross
the cut (`tensors`: name, shape with None for the batch dimension, dtype). The baselines: `edge-only`
(head = the full model, no tail; its tensors are the model outputs) and `cloud-only` (no head, tail =
`full.onnx`; its tensors are the model inputs).

Only json, hashlib and pathlib are used here: the edge agent reads bundles without torch or onnx.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLAN_SCHEMA = "splitinfer.plan/v1"
PLAN_FILE = "plan.json"
EDGE_ONLY = "edge-only"
CLOUD_ONLY = "cloud-only"


class BundleError(ValueError):
    """A bundle directory or its plan.json is missing, malformed or does not match its files."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (None for a dynamic dimension) and numpy dtype name of one tensor."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: Any, where: str = "tensor") -> "TensorSpec":
        """Parse the plan.json form, naming `where` in the error."""
        try:
            shape = tuple(None if d is None else int(d) for d in obj["shape"])
            return cls(name=str(obj["name"]), shape=shape, dtype=str(obj["dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: expected {{name, shape, dtype}}, got {obj!r}") from exc

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The shape with every dynamic dimension set to `batch`."""
        return tuple(batch if d is None else d for d in self.shape)


@dataclass(frozen=True)
class CutArtifacts:
    """The files and cut tensors of one cut of a bundle."""

    id: str
    tensors: tuple[TensorSpec, ...]
    head: Path | None
    head_int8: Path | None
    tail: Path | None
    int8_passed: bool

    @property
    def edge_head(self) -> Path | None:
        """The head the edge runs by default: int8 when it passed its accuracy gate, else fp32."""
        if self.head_int8 is not None and self.int8_passed:
            return self.head_int8
        return self.head


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_entry(root: Path, path: Path) -> dict[str, str]:
    """The plan.json entry {file, sha256} for a file inside bundle `root`."""
    return {"file": path.relative_to(root).as_posix(), "sha256": sha256_file(path)}


class Bundle:
    """A split bundle on disk, checked against its plan.json when loaded."""

    def __init__(self, root: Path, plan: dict[str, Any]):
        self.root = root
        self.plan = plan

    @classmethod
    def load(cls, path: str | Path, verify_hashes: bool = True) -> "Bundle":
        """Read `path/plan.json`, check its schema, and (by default) every artifact's sha256."""
        root = Path(path)
        plan_path = root / PLAN_FILE
        if not root.is_dir():
            raise BundleError(f"{root}: not a bundle directory (expected a directory with {PLAN_FILE})")
        if not plan_path.is_file():
            raise BundleError(f"{root}: no {PLAN_FILE}; make a bundle with `split-profile MODEL --out {root}`")
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
        bundle = cls(root, plan)
        for entry in bundle._all_entries():
            file = bundle._resolve(entry)
            if verify_hashes and sha256_file(file) != entry.get("sha256"):
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
        return self._resolve(self.plan["artifacts"]["full"])

    @property
    def cut_ids(self) -> tuple[str, ...]:
        """Ids of every cut that has artifacts in this bundle."""
        return tuple(self.plan["artifacts"].get("cuts", {}))

    def cut(self, cut_id: str) -> CutArtifacts:
        """The artifacts of cut `cut_id`; BundleError naming the known ids if absent."""
        cuts = self.plan["artifacts"].get("cuts", {})
        if cut_id not in cuts:
            raise BundleError(f"{self.root}: no cut {cut_id!r}; this bundle has {sorted(cuts)}")
        entry = cuts[cut_id]
        gate = self.plan.get("verification", {}).get("cuts", {}).get(cut_id, {}).get("int8", {})
        return CutArtifacts(
            id=cut_id,
            tensors=tuple(TensorSpec.from_json(t, f"artifacts.cuts.{cut_id}.tensors") for t in entry["tensors"]),
            head=self._resolve(entry["head"]) if entry.get("head") else None,
            head_int8=self._resolve(entry["head_int8"]) if entry.get("head_int8") else None,
            tail=self._resolve(entry["tail"]) if entry.get("tail") else None,
            int8_passed=bool(gate.get("passed", False)),
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
        rows = self.plan.get("plan_table") or [{"uplink_mbps": 0.0, "cut": self.chosen}]
        return tuple(sorted((float(r["uplink_mbps"]), str(r["cut"])) for r in rows))

    def best_cut_for(self, uplink_mbps: float) -> str:
        """The plan table's cut for a measured uplink: the row with the largest bandwidth not above it."""
        best = self.plan_table[0][1]
        for mbps, cut_id in self.plan_table:
            if mbps <= uplink_mbps:
                best = cut_id
        return best

    # -- helpers --------------------------------------------------------------------------------

    def _all_entries(self) -> list[dict[str, str]]:
        arts = self.plan["artifacts"]
        entries = [arts["full"]]
        for cut in arts.get("cuts", {}).values():
            entries.extend(cut[k] for k in ("head", "head_int8", "tail") if cut.get(k))
        return entries

    def _resolve(self, entry: Any) -> Path:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise BundleError(f"{self.root}: artifact entry {entry!r} is not {{file, sha256}}")
        rel = Path(entry["file"])
        if rel.is_absolute() or ".." in rel.parts:
            raise BundleError(f"{self.root}: artifact path {entry['file']!r} leaves the bundle directory")
        path = self.root / rel
        if not path.is_file():
            raise BundleError(f"{path}: listed in {PLAN_FILE} but missing")
        return path
