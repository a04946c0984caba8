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
# What a head runs at (all int8; int8 with some nodes kept in float; all float) and how its int8 activation
# ranges were calibrated: plan.json `verification.cuts[id].int8` {precision, calibration, float_nodes}.
HEAD_PRECISIONS = ("int8", "mixed", "fp32")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
CALIBRATION_CHOICES = (*CALIBRATION_METHODS, "auto")  # split-profile --calibration-method: auto tries each in turn


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


POSTPROCESS_KINDS = ("yolo",)
# The outputs a "yolo" postprocess adds to the model's (models.detect writes them)
DETECTION_OUTPUTS = ("boxes", "scores", "classes", "count")


@dataclass(frozen=True)
class Postprocess:
    """plan.json `model.postprocess`: decoding that runs after the tail, on the side that finishes a request.

    kind "yolo" (models.detect): `outputs` name the raw multi-scale maps (N x (4 + num_classes) x H x W), one per
    stride in `strides`; boxes are decoded, thresholded at `conf`, class-aware NMS at `iou`, and padded to
    `max_det`. The result adds `boxes`, `scores`, `classes`, `count` to the model's outputs.
    """

    kind: str
    strides: tuple[int, ...]
    outputs: tuple[str, ...]
    num_classes: int
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 100

    def __post_init__(self) -> None:
        where = "model.postprocess"
        if self.kind not in POSTPROCESS_KINDS:
            raise BundleError(f"{where}.kind: {self.kind!r} is not one of {list(POSTPROCESS_KINDS)}")
        if not self.strides or any(s <= 0 for s in self.strides):
            raise BundleError(f"{where}.strides: expected positive integers, got {list(self.strides)}")
        if len(self.outputs) != len(self.strides) or len(set(self.outputs)) != len(self.outputs):
            raise BundleError(f"{where}.outputs: expected {len(self.strides)} distinct output names (one per "
                              f"stride), got {list(self.outputs)}")
        clash = sorted(set(self.outputs) & set(DETECTION_OUTPUTS))
        if clash:
            raise BundleError(f"{where}.outputs: {clash} is a name the decoded detections take; rename the output")
        if self.num_classes < 1:
            raise BundleError(f"{where}.num_classes: expected >= 1, got {self.num_classes}")
        if not (0.0 <= self.conf <= 1.0 and 0.0 < self.iou <= 1.0):
            raise BundleError(f"{where}: conf must be in [0, 1] and iou in (0, 1], got conf {self.conf} iou {self.iou}")
        if not 1 <= self.max_det <= 100_000:
            raise BundleError(f"{where}.max_det: expected 1..100000, got {self.max_det}")

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"kind": self.kind, "strides": list(self.strides), "outputs": list(self.outputs),
                "num_classes": self.num_classes, "conf": self.conf, "iou": self.iou, "max_det": self.max_det}

    @classmethod
    def from_json(cls, obj: Any) -> Postprocess:
        """Parse the plan.json form; BundleError naming the field that does not fit."""
        kw = _fields(cls, obj, "model.postprocess", ("kind", "strides", "outputs", "num_classes"))
        unknown = sorted(set(obj) - set(kw))
        if unknown:
            raise BundleError(f"model.postprocess: unknown keys {unknown}")
        for key in ("strides", "outputs"):
            if not isinstance(kw[key], list):
                raise BundleError(f"model.postprocess.{key}: expected a list, got {kw[key]!r}")
        try:
            return cls(kind=str(kw["kind"]), strides=tuple(_int(s) for s in kw["strides"]),
                       outputs=tuple(str(o) for o in kw["outputs"]), num_classes=_int(kw["num_classes"]),
                       conf=float(kw.get("conf", 0.25)), iou=float(kw.get("iou", 0.45)),
                       max_det=_int(kw.get("max_det", 100)))
        except (TypeError, ValueError) as exc:
            raise BundleError(f"model.postprocess: {exc}") from exc

    def check_outputs(self, names: Iterable[str]) -> None:
        """BundleError unless every raw output it decodes is among the model outputs `names`, and none of the
        model's outputs already takes a decoded output's name."""
        have = set(names)
        missing = [o for o in self.outputs if o not in have]
        if missing:
            raise BundleError(f"model.postprocess.outputs: {missing} are not model outputs (it has {sorted(have)})")
        clash = sorted(have & set(DETECTION_OUTPUTS))
        if clash:
            raise BundleError(f"model.postprocess: model outputs {clash} clash with the decoded detections' names")


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)) or int(v) != float(v):
        raise ValueError(f"expected an integer, got {v!r}")
    return int(v)


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
    # decoding after the tail (a detector's boxes); absent: the outputs are the model's own
    postprocess: Postprocess | None = None

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        optional = ("uncosted_nodes", "postprocess")
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in optional}
        doc.update(inputs=[s.to_json() for s in self.inputs], outputs=[s.to_json() for s in self.outputs])
        for key in optional:
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key).to_json()
        return doc

    @classmethod
    def from_json(cls, obj: Any) -> ModelRecord:
        """Parse the plan.json form."""
        required = tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("uncosted_nodes", "postprocess"))
        kw = _fields(cls, obj, "model", required)
        kw["inputs"] = tuple(TensorSpec.from_json(t, "model.inputs") for t in kw["inputs"])
        kw["outputs"] = tuple(TensorSpec.from_json(t, "model.outputs") for t in kw["outputs"])
        if kw.get("uncosted_nodes") is not None:
            kw["uncosted_nodes"] = UncostedNodes.from_json(kw["uncosted_nodes"])
        if kw.get("postprocess") is not None:
            kw["postprocess"] = Postprocess.from_json(kw["postprocess"])
            kw["postprocess"].check_outputs(t.name for t in kw["outputs"])
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
    runtime: str | None = None  # what the costs assume runs the model: "onnxruntime" | "litert"
    providers: tuple[str, ...] | None = None  # onnxruntime's execution providers, preferred first

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        host = None if self.host is None else dict(self.host)
        power = None if self.power is None else self.power.to_json()
        providers = None if self.providers is None else list(self.providers)
        return _present([("name", self.name), ("kind", self.kind), ("source", self.source), ("host", host),
                         ("device_table", self.device_table), ("gpu_table", self.gpu_table), ("power", power),
                         ("runtime", self.runtime), ("providers", providers)])

    @classmethod
    def from_json(cls, obj: Any, where: str) -> SideRecord:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, where, ("name", "kind", "source"))
        if kw.get("power") is not None:
            kw["power"] = Power(**_fields(Power, kw["power"], f"{where}.power"))
        if isinstance(kw.get("providers"), list):
            kw["providers"] = tuple(kw["providers"])
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


TFLITE_KEYS = ("head_tflite", "head_int8_tflite")  # plan.json keys of a cut's LiteRT heads


@dataclass(frozen=True)
class CutFiles:
    """plan.json `artifacts.cuts[id]`: the tensors that cross the cut and its head, int8 head and tail files
    (and, when the bundle was made for LiteRT devices, `head_tflite` / `head_int8_tflite`: the same head as .tflite)."""

    tensors: tuple[TensorSpec, ...]
    head: ArtifactEntry | None
    head_int8: ArtifactEntry | None
    tail: ArtifactEntry | None
    head_tflite: ArtifactEntry | None = None
    head_int8_tflite: ArtifactEntry | None = None

    def to_json(self) -> dict[str, Any]:
        """The plan.json form (the tflite keys only where there are tflite heads)."""
        tflite = _present((k, _entry(getattr(self, k))) for k in TFLITE_KEYS)
        return {"tensors": [t.to_json() for t in self.tensors], "head": _entry(self.head),
                "head_int8": _entry(self.head_int8), "tail": _entry(self.tail), **tflite}

    @property
    def entries(self) -> tuple[ArtifactEntry, ...]:
        """Every file of this cut."""
        files = (self.head, self.head_int8, self.tail, self.head_tflite, self.head_int8_tflite)
        return tuple(e for e in files if e is not None)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> CutFiles:
        """Parse the plan.json form."""
        kw = _fields(cls, obj, where, ("tensors",))
        return cls(tuple(TensorSpec.from_json(t, f"{where}.tensors") for t in kw["tensors"]),
                   *(_maybe_entry(kw.get(k), where) for k in ("head", "head_int8", "tail", *TFLITE_KEYS)))


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
    # The .tflite heads (LiteRT) then the ONNX tail against the model: {"fp32": split-like check, "int8": the int8
    # gate's record} or {"error": why the conversion failed}; None when the bundle has no tflite heads.
    litert: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The plan.json form."""
        return {"split": dict(self.split), **({} if self.int8 is None else {"int8": dict(self.int8)}),
                **({} if self.litert is None else {"litert": dict(self.litert)})}

    @property
    def precision(self) -> str | None:
        """What the edge runs this cut's head at: "int8", "mixed" or "fp32" (None without a head).

        Plans written before mixed precision say only whether the int8 head passed its gate.
        """
        if self.int8 is None:
            return None
        return str(self.int8.get("precision") or ("int8" if self.int8.get("passed") else "fp32"))

    @property
    def float_nodes(self) -> tuple[str, ...]:
        """The head's nodes kept in float (mixed precision); () for older plans."""
        return tuple((self.int8 or {}).get("float_nodes") or ())

    @classmethod
    def from_json(cls, obj: Any, where: str) -> CutVerification:
        """Parse the plan.json form (the precision fields, absent from older plans, are checked when present)."""
        kw = _fields(cls, obj, where, ("split",))
        gate = kw.get("int8")
        if gate is not None:
            if not isinstance(gate, dict):
                raise BundleError(f"{where}.int8: expected an object, got {gate!r}")
            if "precision" in gate and gate["precision"] not in HEAD_PRECISIONS:
                raise BundleError(f"{where}.int8.precision: expected one of {HEAD_PRECISIONS}, "
                                  f"got {gate['precision']!r}")
            if "calibration" in gate and gate["calibration"] not in CALIBRATION_METHODS:
                raise BundleError(f"{where}.int8.calibration: expected one of {CALIBRATION_METHODS}, "
                                  f"got {gate['calibration']!r}")
            floats = gate.get("float_nodes", [])
            if not isinstance(floats, list) or not all(isinstance(n, str) for n in floats):
                raise BundleError(f"{where}.int8.float_nodes: expected a list of node names, got {floats!r}")
        return cls(**kw)


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
        cuts = {cid: CutVerification.from_json(v, f"verification.cuts.{cid}") for cid, v in kw["cuts"].items()}
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
