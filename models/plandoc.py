"""plan.json as typed records: what `split-profile` writes and the CLI, `Bundle` and the tools read.

`PlanDocument.to_json()` is plan.json (schema `splitinfer.plan/v1`, keys in the order written since v1);
`PlanDocument.from_json` reads it back, raising BundleError at the first key that does not fit. The names here
are re-exported by `models.manifest`, the bundle reader. Only the standard library is imported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PLAN_SCHEMA = "splitinfer.plan/v1"
PLAN_FILE = "plan.json"
EDGE_ONLY = "edge-only"  # the baselines' cut ids: the whole model on the device, or all of it in the cloud
CLOUD_ONLY = "cloud-only"
BASELINES = (EDGE_ONLY, CLOUD_ONLY)
# How cut activations travel (protos.codec implements them; the planner counts their bytes per element).
CODECS = ("fp32", "fp16", "int8", "int8c")
COMPRESSIONS = ("none", "lz4", "zstd")  # a codec spec is quantizer[+compression], e.g. int8c+zstd


def split_codec_spec(spec: Any) -> tuple[str, str] | None:
    """(quantizer, compression) of a codec spec like `int8+zstd`, or None when it is not one."""
    if not isinstance(spec, str):
        return None
    text = spec.strip().lower()
    quantizer, _, compression = text.partition("+")
    compression = compression or "none"
    if quantizer not in CODECS or compression not in COMPRESSIONS or compression == "none" and "+" in text:
        return None
    return quantizer, compression


def _codec_field(value: Any, where: str) -> str | None:
    """A plan.json codec spec (or null), checked."""
    if value is None:
        return None
    if split_codec_spec(value) is None:
        raise BundleError(f"{where}: expected a codec spec like \"int8+zstd\" or null, got {value!r}")
    return str(value)


def _ms_field(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise BundleError(f"{where}: expected a number of ms >= 0, got {value!r}")
    return float(value)
# What the planner may minimise, and the candidate field that holds it.
OBJECTIVES = ("latency", "energy", "bytes")
OBJECTIVE_FIELDS = {"latency": "total_ms", "energy": "energy_mj", "bytes": "transfer_bytes"}


class Rankable(Protocol):
    """A cut's costs as the planner and plan.json both hold them."""

    @property
    def id(self) -> str: ...
    @property
    def total_ms(self) -> float: ...
    @property
    def energy_mj(self) -> float: ...
    @property
    def transfer_bytes(self) -> int: ...


def rank_key(cand: Rankable, objective: str) -> tuple[float, float, int, str]:
    """How cuts are ordered, best first: the objective, then lower latency, fewer bytes, the id."""
    return (float(getattr(cand, OBJECTIVE_FIELDS[objective])), cand.total_ms, cand.transfer_bytes, cand.id)


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
    def from_json(cls, obj: Any, where: str = "tensor") -> TensorSpec:
        """Parse the plan.json form, naming `where` in the error."""
        try:
            shape = tuple(None if d is None else int(d) for d in obj["shape"])
            return cls(name=str(obj["name"]), shape=shape, dtype=str(obj["dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: expected {{name, shape, dtype}}, got {obj!r}") from exc

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The shape with every dynamic dimension set to `batch`."""
        return tuple(batch if d is None else d for d in self.shape)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the plan document: plan.json as typed records, written by partitioning and read by the CLI and Bundle ------


def _fields(cls: Any, obj: Any, where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword arguments of dataclass `cls` from the JSON object `obj` (absent optional fields keep defaults)."""
    if not isinstance(obj, dict):
        raise BundleError(f"{where}: expected an object, got {obj!r}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise BundleError(f"{where}: missing key {missing[0]!r}")
    return {f.name: obj[f.name] for f in dataclasses.fields(cls) if f.name in obj}


def _present(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in pairs if v is not None}


@dataclass(frozen=True)
class UncostedNodes:
    """plan.json `model.uncosted_nodes`: how many nodes' work could not be determined, and a few of them."""

    count: int
    examples: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"count": self.count, "examples": list(self.examples)}

    @classmethod
    def from_json(cls, obj: Any) -> UncostedNodes:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, "model.uncosted_nodes", ("count",))
        try:
            return cls(int(kw["count"]), tuple(str(e) for e in kw.get("examples", ())))
        except (TypeError, ValueError) as exc:
            raise BundleError(f"model.uncosted_nodes: expected {{count, examples}}, got {obj!r}") from exc


@dataclass(frozen=True)
class ModelRecord:
    """plan.json `model`: what was planned, where it came from, its inputs and outputs."""

    name: str
    source: str
    format: str
    sha256: str
    onnx_sha256: str
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    nodes: int
    # nodes costed without knowing their work (estimated costs only); absent from older plan.json files
    uncosted_nodes: UncostedNodes | None = None

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "uncosted_nodes"}
        doc.update(inputs=[s.to_json() for s in self.inputs], outputs=[s.to_json() for s in self.outputs])
        if self.uncosted_nodes is not None:
            doc["uncosted_nodes"] = self.uncosted_nodes.to_json()
        return doc

    @classmethod
    def from_json(cls, obj: Any) -> ModelRecord:
        """Parse the plan.json form."""
        required = tuple(f.name for f in dataclasses.fields(cls) if f.name != "uncosted_nodes")
        kw = _fields(cls, obj, "model", required)
        kw["inputs"] = tuple(TensorSpec.from_json(t, "model.inputs") for t in kw["inputs"])
        kw["outputs"] = tuple(TensorSpec.from_json(t, "model.outputs") for t in kw["outputs"])
        if kw.get("uncosted_nodes") is not None:
            kw["uncosted_nodes"] = UncostedNodes.from_json(kw["uncosted_nodes"])
        return cls(**kw)


@dataclass(frozen=True)
class Power:
    """The edge's power model: watts while computing and while waiting."""

    active_w: float | None
    idle_w: float | None
    source: str | None = None  # said when the numbers are assumed

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"active_w": self.active_w, "idle_w": self.idle_w, **_present([("source", self.source)])}


@dataclass(frozen=True)
class SideRecord:
    """plan.json `device` or `cloud`: which costs were used for that side and where they came from."""

    name: str
    kind: str  # "measured" | "estimated"
    source: str
    host: Mapping[str, Any] | None = None  # measured here: this host's facts
    device_table: str | None = None  # estimated from the device table: its source
    gpu_table: str | None = None  # estimated from the GPU table: its source
    power: Power | None = None  # the device only

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        host = None if self.host is None else dict(self.host)
        power = None if self.power is None else self.power.to_json()
        return _present([("name", self.name), ("kind", self.kind), ("source", self.source), ("host", host),
                         ("device_table", self.device_table), ("gpu_table", self.gpu_table), ("power", power)])

    @classmethod
    def from_json(cls, obj: Any, where: str) -> SideRecord:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, where, ("name", "kind", "source"))
        if kw.get("power") is not None:
            kw["power"] = Power(**_fields(Power, kw["power"], f"{where}.power"))
        return cls(**kw)


@dataclass(frozen=True)
class NetworkRecord:
    """plan.json `network`: the link the plan was made for."""

    name: str
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    tx_nj_per_byte: float
    source: str

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BudgetsRecord:
    """plan.json `budgets`: the user's limits (None: none) and the objective."""

    max_latency_ms: float | None = None
    edge_memory_mb: float | None = None
    max_energy_mj: float | None = None
    objective: str = "latency"

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CandidateRecord:
    """plan.json `candidates[i]`: one cut's simulated (or, when measured, timed) costs."""

    id: str
    cut: tuple[str, ...]
    edge_nodes: int
    edge_ms: float
    transfer_bytes: int
    transfer_ms: float
    cloud_ms: float
    total_ms: float
    edge_memory_bytes: int
    energy_mj: float
    feasible: bool
    violations: tuple[str, ...] = ()
    measured: bool = False
    predicted: Mapping[str, float] | None = None  # when measured: the cost model's {edge_ms, cloud_ms}
    # The codec the cut tensors are sent with (None: nothing is sent, or a plan older than the choice: the
    # agent's configured codec), its encode time on the device and decode time in the cloud (in total_ms).
    codec: str | None = None
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    # every codec costed for this cut: spec -> {transfer_bytes, encode_ms, decode_ms, transfer_ms, total_ms}
    codecs: Mapping[str, Mapping[str, float]] | None = None
    codecs_rejected: Mapping[str, str] | None = None  # spec -> why the accuracy gate dropped it

    _CODEC_KEYS = ("transfer_bytes", "encode_ms", "decode_ms", "transfer_ms", "total_ms")

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        optional = ("predicted", "codecs", "codecs_rejected")
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in optional}
        doc.update(cut=list(self.cut), violations=list(self.violations))
        if self.measured:
            doc["predicted"] = dict(self.predicted or {})
        if self.codecs is not None:
            doc["codecs"] = {k: dict(v) for k, v in self.codecs.items()}
        if self.codecs_rejected is not None:
            doc["codecs_rejected"] = dict(self.codecs_rejected)
        return doc

    @classmethod
    def from_json(cls, obj: Any) -> CandidateRecord:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, "candidates", ("id", "cut", "edge_ms", "transfer_bytes", "transfer_ms", "cloud_ms",
                                               "total_ms", "edge_memory_bytes", "energy_mj", "feasible"))
        kw.update(cut=tuple(kw["cut"]), violations=tuple(kw.get("violations", ())))
        kw.setdefault("edge_nodes", 0)
        where = f"candidates[{kw['id']!r}]"
        kw["codec"] = _codec_field(kw.get("codec"), f"{where}.codec")
        for key in ("encode_ms", "decode_ms"):
            kw[key] = _ms_field(kw.get(key, 0.0), f"{where}.{key}")
        codecs = kw.get("codecs")
        if codecs is not None:
            if not isinstance(codecs, dict):
                raise BundleError(f"{where}.codecs: expected an object of codec spec -> costs, got {codecs!r}")
            kw["codecs"] = {_codec_field(spec, f"{where}.codecs"): cls._codec_costs(v, f"{where}.codecs.{spec}")
                            for spec, v in codecs.items()}
        rejected = kw.get("codecs_rejected")
        if rejected is not None:
            if not isinstance(rejected, dict):
                raise BundleError(f"{where}.codecs_rejected: expected an object of codec spec -> why, got {rejected!r}")
            kw["codecs_rejected"] = {_codec_field(k, f"{where}.codecs_rejected"): str(v) for k, v in rejected.items()}
        return cls(**kw)

    @classmethod
    def _codec_costs(cls, obj: Any, where: str) -> dict[str, float]:
        if not isinstance(obj, dict) or any(k not in obj for k in cls._CODEC_KEYS):
            raise BundleError(f"{where}: expected an object with {', '.join(cls._CODEC_KEYS)}, got {obj!r}")
        costs = {k: _ms_field(obj[k], f"{where}.{k}") for k in cls._CODEC_KEYS}
        return {**costs, "transfer_bytes": int(costs["transfer_bytes"])}


@dataclass(frozen=True)
class PlanRow:
    """plan.json `plan_table[i]`: the best cut from this uplink bandwidth up."""

    uplink_mbps: float
    cut: str
    codec: str | None = None  # the codec of that cut at this rate (absent in plans older than the choice)

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"uplink_mbps": self.uplink_mbps, "cut": self.cut, **_present([("codec", self.codec)])}

    @classmethod
    def from_json(cls, obj: Any) -> PlanRow:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, "plan_table", ("uplink_mbps", "cut"))
        return cls(float(kw["uplink_mbps"]), str(kw["cut"]), _codec_field(kw.get("codec"), "plan_table.codec"))


@dataclass(frozen=True)
class TieBreak:
    """One head-to-head timing of the two best timed cuts (partitioning.refine)."""

    candidates: tuple[str, ...]
    reason: str
    runs: int
    rounds: int
    min_seconds: float
    before: Mapping[str, float]  # their objective values before, as timed by the refinement
    predicted: Mapping[str, float]  # their objective values by the per-node model

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"candidates": list(self.candidates), "reason": self.reason, "runs": self.runs, "rounds": self.rounds,
                "min_seconds": self.min_seconds, "before": dict(self.before), "predicted": dict(self.predicted)}

    @classmethod
    def from_json(cls, obj: Any) -> TieBreak:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, "refined.tie_break", ("candidates", "reason", "runs"))
        kw["candidates"] = tuple(kw["candidates"])
        return cls(**{"rounds": 0, "min_seconds": 0.0, "before": {}, "predicted": {}, **kw})


@dataclass(frozen=True)
class Refinement:
    """plan.json `refined`: which cuts were timed as real head and tail, or why none was (`reason`)."""

    candidates: tuple[str, ...] = ()
    reason: str | None = None  # set when nothing was timed
    runs: int = 0
    rounds: int = 0
    min_seconds: float = 0.0
    edge_threads: int | None = None
    cloud_threads: int | None = None
    chosen_timed: bool = True
    tie_break: TieBreak | None = None
    earlier_tie_breaks: tuple[TieBreak, ...] = ()  # head-to-heads that handed the choice to an untimed cut

    @classmethod
    def skipped(cls, reason: str) -> Refinement:
        """Nothing timed, for `reason`."""
        return cls(reason=reason)

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        if self.reason is not None:
            return {"candidates": list(self.candidates), "reason": self.reason}
        doc = {"candidates": list(self.candidates), "runs": self.runs, "rounds": self.rounds,
               "min_seconds": self.min_seconds, "edge_threads": self.edge_threads,
               "cloud_threads": self.cloud_threads, "chosen_timed": self.chosen_timed,
               "tie_break": None if self.tie_break is None else self.tie_break.to_json()}
        if self.earlier_tie_breaks:
            doc["earlier_tie_breaks"] = [t.to_json() for t in self.earlier_tie_breaks]
        return doc

    @classmethod
    def from_json(cls, obj: Any) -> Refinement:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, "refined", ("candidates",))
        kw["candidates"] = tuple(kw["candidates"])
        if kw.get("tie_break") is not None:
            kw["tie_break"] = TieBreak.from_json(kw["tie_break"])
        kw["earlier_tie_breaks"] = tuple(TieBreak.from_json(t) for t in kw.get("earlier_tie_breaks") or ())
        return cls(**kw)


@dataclass(frozen=True)
class Calibration:
    """plan.json `calibration`: what the int8 heads were calibrated on."""

    source: str  # a folder, or "synthetic"
    samples: int

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"source": self.source, "samples": self.samples}


@dataclass(frozen=True)
class ArtifactEntry:
    """One file of the bundle: its path inside the bundle and its sha256."""

    file: str
    sha256: str

    @classmethod
    def of(cls, root: Path, path: Path) -> ArtifactEntry:
        """The entry of `path`, a file inside bundle `root`."""
        return cls(path.relative_to(root).as_posix(), sha256_file(path))

    def to_json(self) -> dict[str, str]:
        """The plan.json form."""
        return {"file": self.file, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ArtifactEntry:
        """Parse the plan.json form."""
        if not isinstance(obj, dict) or not isinstance(obj.get("file"), str):
            raise BundleError(f"{where}: artifact entry {obj!r} is not {{file, sha256}}")
        return cls(obj["file"], str(obj.get("sha256", "")))


def _entry(entry: ArtifactEntry | None) -> dict[str, str] | None:
    return None if entry is None else entry.to_json()


def _maybe_entry(obj: Any, where: str) -> ArtifactEntry | None:
    return ArtifactEntry.from_json(obj, where) if obj else None


@dataclass(frozen=True)
class CutFiles:
    """plan.json `artifacts.cuts[id]`: the tensors that cross the cut and its head, int8 head and tail files."""

    tensors: tuple[TensorSpec, ...]
    head: ArtifactEntry | None
    head_int8: ArtifactEntry | None
    tail: ArtifactEntry | None

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"tensors": [t.to_json() for t in self.tensors], "head": _entry(self.head),
                "head_int8": _entry(self.head_int8), "tail": _entry(self.tail)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> CutFiles:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, where, ("tensors",))
        return cls(tuple(TensorSpec.from_json(t, f"{where}.tensors") for t in kw["tensors"]),
                   *(_maybe_entry(kw.get(k), where) for k in ("head", "head_int8", "tail")))


@dataclass(frozen=True)
class Artifacts:
    """plan.json `artifacts`: the full model, the chosen cut's files, and every exported cut's files."""

    full: ArtifactEntry
    cuts: Mapping[str, CutFiles]
    head: ArtifactEntry | None = None
    head_int8: ArtifactEntry | None = None
    tail: ArtifactEntry | None = None

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"full": self.full.to_json(), "head": _entry(self.head), "head_int8": _entry(self.head_int8),
                "tail": _entry(self.tail), "cuts": {cid: c.to_json() for cid, c in self.cuts.items()}}

    @classmethod
    def from_json(cls, obj: Any) -> Artifacts:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, "artifacts", ("full",))
        cuts = kw.get("cuts") or {}
        if not isinstance(cuts, dict):
            raise BundleError(f"artifacts.cuts: expected an object of cut id -> files, got {cuts!r}")
        return cls(ArtifactEntry.from_json(kw["full"], "artifacts.full"),
                   {cid: CutFiles.from_json(c, f"artifacts.cuts.{cid}") for cid, c in cuts.items()},
                   *(_maybe_entry(kw.get(k), "artifacts") for k in ("head", "head_int8", "tail")))


@dataclass(frozen=True)
class CutVerification:
    """plan.json `verification.cuts[id]`: head-then-tail against the model, and the int8 head's accuracy gate."""

    split: Mapping[str, Any]  # max_abs_error, passed, and tolerance + samples or a note
    int8: Mapping[str, Any] | None = None  # metric, value, threshold, passed, samples; None without a head

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"split": dict(self.split), **({} if self.int8 is None else {"int8": dict(self.int8)})}


@dataclass(frozen=True)
class Verification:
    """plan.json `verification`: every exported cut checked on `samples` inputs."""

    samples: int
    calibration_samples: int
    cuts: Mapping[str, CutVerification]

    @property
    def passed(self) -> bool:
        """Every cut's head then tail matched the model."""
        return all(bool(v.split.get("passed")) for v in self.cuts.values())

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"samples": self.samples, "calibration_samples": self.calibration_samples,
                "cuts": {cid: v.to_json() for cid, v in self.cuts.items()}, "passed": self.passed}

    @classmethod
    def from_json(cls, obj: Any) -> Verification:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, "verification", ("cuts",))
        cuts = {cid: CutVerification(**_fields(CutVerification, v, f"verification.cuts.{cid}", ("split",)))
                for cid, v in kw["cuts"].items()}
        return cls(int(kw.get("samples", 0)), int(kw.get("calibration_samples", 0)), cuts)


@dataclass(frozen=True)
class PlanDocument:
    """plan.json, typed: what `split-profile` writes and the CLI, `Bundle` and the tools read."""

    created: str
    generator: str
    model: ModelRecord
    device: SideRecord
    cloud: SideRecord
    network: NetworkRecord
    budgets: BudgetsRecord
    codec: str
    candidates: tuple[CandidateRecord, ...]
    chosen: str
    feasible: bool
    plan_table: tuple[PlanRow, ...]
    refined: Refinement | None = None
    calibration: Calibration | None = None
    artifacts: Artifacts | None = None  # with verification: once the bundle is written
    verification: Verification | None = None
    schema: str = PLAN_SCHEMA

    def candidate(self, cut_id: str) -> CandidateRecord:
        """The candidate `cut_id`; KeyError if absent."""
        for cand in self.candidates:
            if cand.id == cut_id:
                return cand
        raise KeyError(f"no candidate {cut_id!r}")

    def ranked(self) -> list[CandidateRecord]:
        """Every candidate, best first by the objective (models.manifest.rank_key)."""
        return sorted(self.candidates, key=lambda c: rank_key(c, self.budgets.objective))

    def to_json(self) -> dict[str, Any]:
        """The plan.json form (key order as written since schema v1)."""
        doc = {"schema": self.schema, "created": self.created, "generator": self.generator,
               "model": self.model.to_json(), "device": self.device.to_json(), "cloud": self.cloud.to_json(),
               "network": self.network.to_json(), "budgets": self.budgets.to_json(), "codec": self.codec,
               "candidates": [c.to_json() for c in self.candidates], "chosen": self.chosen, "feasible": self.feasible,
               "plan_table": [r.to_json() for r in self.plan_table]}
        for key in ("refined", "calibration", "artifacts", "verification"):
            part = getattr(self, key)
            if part is not None:
                doc[key] = part.to_json()
        return doc

    @classmethod
    def from_json(cls, obj: Any) -> PlanDocument:
        """Parse plan.json as split-profile writes it; BundleError naming the first key that does not fit."""
        kw = _fields(cls, obj, PLAN_FILE, ("model", "device", "cloud", "network", "budgets", "candidates", "chosen",
                                           "plan_table"))
        try:
            return cls(
                created=str(kw.get("created", "")), generator=str(kw.get("generator", "")),
                model=ModelRecord.from_json(kw["model"]), device=SideRecord.from_json(kw["device"], "device"),
                cloud=SideRecord.from_json(kw["cloud"], "cloud"),
                network=NetworkRecord(**_fields(NetworkRecord, kw["network"], "network")),
                budgets=BudgetsRecord(**_fields(BudgetsRecord, kw["budgets"], "budgets")),
                codec=str(kw.get("codec", "int8")),
                candidates=tuple(CandidateRecord.from_json(c) for c in kw["candidates"]),
                chosen=str(kw["chosen"]), feasible=bool(kw.get("feasible", True)),
                plan_table=tuple(PlanRow.from_json(r) for r in kw["plan_table"]),
                refined=None if kw.get("refined") is None else Refinement.from_json(kw["refined"]),
                calibration=None if kw.get("calibration") is None else Calibration(
                    **_fields(Calibration, kw["calibration"], "calibration", ("source", "samples"))),
                artifacts=None if kw.get("artifacts") is None else Artifacts.from_json(kw["artifacts"]),
                verification=None if kw.get("verification") is None else Verification.from_json(kw["verification"]),
                schema=str(kw.get("schema", PLAN_SCHEMA)),
            )
        except TypeError as exc:  # a record with a key it does not have, or without one it needs
            raise BundleError(f"{PLAN_FILE}: {exc}") from exc
