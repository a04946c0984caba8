"""The planner: a pure function from per-node costs, network and budgets to a frozen Plan.

Cost of a cut, where E is the set of nodes run on the edge (closed under predecessors: data only flows
edge -> cloud) and C = crossing tensors (made on the edge or model inputs, read in the cloud):

    edge_ms     = o_edge + sum_{v in E} e(v) + B_edge                      (0 when E is empty)
    up_bytes    = MSG + sum_{t in C} (TENSOR + wire_k(t))         wire_k(t): t's bytes under codec k
    down_bytes  = MSG + sum_{t in outputs} (TENSOR + bytes(t))    results come back as fp32
    transfer_ms = rtt + 8 * up_bytes / uplink + 8 * down_bytes / downlink      (0 for edge-only)
    encode_ms   = sum_{t in C} enc_k(bytes(t)),  decode_ms = sum_{t in C} dec_k(bytes(t))   (0 for edge-only)
    cloud_ms    = o_cloud + sum_{v not in E} c(v) + B_cloud                (0 for edge-only)
    total_ms    = edge_ms + encode_ms + transfer_ms + decode_ms + cloud_ms
    energy_mj   = P_active * (edge_ms + encode_ms) + P_idle * (transfer_ms + decode_ms + cloud_ms) + e_tx * up_bytes
    memory      = weights of E (int8: fp32 bytes / 4) + peak live activations while the head runs

The codec k is chosen with the cut (`CodecCosts`): each cut, cloud-only included (its cut tensors are the
model inputs), is costed under every codec the planner was given, and the one that ranks best at the link
(objective, then latency, then bytes) is the candidate's; the plan table chooses again at each rate. wire_k is
exact for a codec without compression (numel x bytes per element, plus one scale and zero point per channel
for int8c) and the measured ratio of the compressed to the uncompressed payload on representative
activations otherwise; enc_k and dec_k are times measured for the side that runs them, on that tensor where
it was timed, else fixed + per MB. A codec the accuracy gate rejected for a cut is not costed for it. Without
`CodecCosts` every cut is sent with `CostInputs.codec` at no encode or decode cost (the one-codec model of
earlier plans).

The boundary terms (0 for the baselines, and when a side has no `BoundaryRates`) are what the per-node sums,
taken in one full-model run, miss when the model is cut; with a side's launch cost l and memory rate g:

    B_edge  = sum_{t in C, 4-D float} (l + bytes(t) / g)         if the edge runtime reorders layouts
    B_cloud = sum_{t in C, 4-D float} (l + bytes(t) / g)         if the cloud runtime reorders layouts
              + sum_{v in U} (l + out(v) / g)
              - sum_{v in R} r(v)
    U       = cloud nodes that cost 0 in the full run (fused into the node that makes their input), not view
              ops, reached from a cut tensor through such nodes: cut off from their producer they run alone
    out(v)  = bytes of v's outputs
    R       = cloud nodes reading a cut tensor that are not Conv or pooling, where the cloud reorders layouts:
              the full run converted such a node's output back from the blocked layout (a reorder r(v) that
              the profile charges to v, part of c(v)); fed a plain cut tensor it runs plain, and the head
              already converted the tensor (B_edge), so that reorder is not run in the cloud

A runtime that keeps convolutions' activations in a blocked layout (onnxruntime's NCHWc on x86) converts each
4-D cut tensor back on the edge and forward again in the cloud (measured on tiny_cnn: 10 of the 33 us a cut
added); a Conv + Add + Relu fused in the full run runs as three kernels when the cut feeds the Add, and
the next residual block's Add, fed by that lone Relu, is not fused either. g is the rate the side's memory-bound
kernels achieved, counting their input and output bytes; one pass over a kernel's output bytes at that rate
came within 1.5x of every reorder, Relu and Add that a cut added to resnet18 and tiny_cnn on x86.

Refinement (`apply_measured`): a candidate whose head and tail were extracted and timed (partitioning.refine)
takes the timed values for edge_ms and cloud_ms in place of the two sums above; transfer and memory are
unchanged, energy and total follow from the same formula, the budgets are checked again, and the plan is
chosen again over all candidates (timed or not) and its plan table rebuilt. The sums are kept as the
candidate's prediction, so the cost model can still be judged against independent measurements.

Search (separate from this simulation): every prefix of the topological order, both baselines, and the
exact minimum of each additive objective (latency, energy, bytes, and latency + lambda * energy mixtures)
over ALL closed edge sets, found as a minimum s-t cut (DADS): node v -> sink costs e(v) (v on edge),
source -> v costs c(v) (v in cloud), producer -> aux(t) costs transfer(t) once however many cloud
consumers read t, and infinite reverse edges forbid cloud -> edge flow. The boundary terms enter the search
per crossing tensor: exactly for the reorders, approximately for U (each tensor is charged the fused
chain its readers start, as if all of them ran in the cloud), and without R (a credit a min-cut cannot
take); every candidate is then simulated exactly as above. Without budgets, and with U and R empty, the
chosen cut is therefore the global optimum (with U or R, the optimum of that per-tensor approximation, or a
better cut found among the prefixes); with budgets it is the best
feasible cut among these (which include the optimum whenever that is feasible, and the Lagrangian points of
the latency/energy trade-off otherwise).

Speed (the numbers are those of the formula above, bit for bit; tests/unit/test_planning_scale.py checks it
against the straightforward computation): tensor sizes are computed once; a candidate's compute and memory,
which do not depend on the link, are simulated once and only transfer, energy and total are redone at each
plan-table rate; the prefixes' cut tensors and peak memory come from one sweep along the topological order;
each distinct min-cut weighting is solved once, starting from the previous one's flow.

Memory (linear in the graph): a prefix candidate's edge set is a `TopoPrefix`, the graph's order and a length,
equal to (and iterating like) the frozenset of its nodes; n frozensets of up to n names made the peak grow as
n^1.7 (583 MB at 5,000 nodes).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from models.manifest import CLOUD_ONLY, CODECS, EDGE_ONLY, OBJECTIVES, BudgetsRecord, CandidateRecord, rank_key
from models.plandoc import split_codec_spec
from partitioning.costtypes import BoundaryRates, CodecRate
from partitioning.flops import VIEW_OPS
from partitioning.graph import CutGraph

__all__ = ["OBJECTIVES", "EDGE_ONLY", "CLOUD_ONLY", "BoundaryRates", "Link", "Budgets", "CostInputs", "Candidate",
           "Plan", "TopoPrefix", "plan_cuts", "apply_measured", "evaluate_cut", "rank", "choose", "search_edge_sets",
           "min_cut_edge_set", "wire_bytes", "transfer_ms", "peak_activation_bytes", "boundary_ms", "CodecRate",
           "CodecCosts", "CodecOption", "CODEC_SPECS"]
# Ops that onnxruntime runs in the blocked layout even when their input arrives plain (it reorders it first);
# any other op fed a plain cut tensor runs plain.
BLOCKED_LAYOUT_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"})
CODEC_ITEMSIZE = dict(zip(CODECS, (4, 2, 1, 1)))  # bytes per float element on the wire under each codec
MSG_OVERHEAD_BYTES = 64  # request framing: ids, model, cut, timestamps
TENSOR_OVERHEAD_BYTES = 32  # per tensor: name, dtype, shape, quantization parameters
# progress of a long search: (what, done, total), e.g. ("min-cuts", 3, 61) or ("simulating", 500, 1200)
SearchProgress = Callable[[str, int, int], None]
# Every codec the planner chooses among (models.wirecodec specs): fp32 raw, and each lossy quantizer with and
# without compression.
CODEC_SPECS = ("fp32", *(q if c == "none" else f"{q}+{c}" for q in ("fp16", "int8", "int8c")
                        for c in ("none", "lz4", "zstd")))
_T = TypeVar("_T")
PLAN_TABLE_MBPS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


@dataclass(frozen=True)
class Link:
    """The network numbers the cost formula needs."""

    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    tx_nj_per_byte: float = 0.0

    def __post_init__(self) -> None:
        if self.uplink_mbps <= 0 or self.downlink_mbps <= 0 or self.rtt_ms < 0:
            raise ValueError(f"network needs uplink/downlink > 0 Mbps and rtt >= 0 ms, got {self}")


@dataclass(frozen=True)
class Budgets(BudgetsRecord):
    """The user's limits and what to minimise (plan.json's budgets record, checked)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("max_latency_ms", "edge_memory_mb", "max_energy_mj"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class CodecCosts:
    """The codecs a cut may be sent with (module docstring): encode rates on the device, decode rates in the
    cloud, the measured compression of each tensor, and the (cut, codec) pairs the accuracy gate rejected."""

    encode: Mapping[str, CodecRate]  # spec -> rate on the device; its keys are the codecs costed
    decode: Mapping[str, CodecRate]  # spec -> rate in the cloud
    # spec (with compression) -> tensor -> compressed / uncompressed payload bytes; a tensor absent: 1.0
    ratios: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    denied: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # cut id -> spec -> why
    source: str = ""
    # spec -> tensor -> ms timed on that very tensor (each side's), used in place of the rate where present
    tensor_encode: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    tensor_decode: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    unquantizable: frozenset[str] = frozenset()  # tensors with non-finite values: never sent as int8 / int8c

    def __post_init__(self) -> None:
        for spec in self.encode:
            if split_codec_spec(spec) is None:
                raise ValueError(f"codec {spec!r}: expected quantizer[+lz4|+zstd], quantizer one of {CODECS}")
            if spec not in self.decode:
                raise ValueError(f"codec {spec!r} has an encode rate but no decode rate")


@dataclass(frozen=True)
class CodecOption:
    """A cut sent with one codec: its upload bytes and its encode (device) and decode (cloud) time."""

    codec: str | None  # None: nothing is sent (edge-only)
    up_bytes: int
    encode_ms: float = 0.0
    decode_ms: float = 0.0


@dataclass(frozen=True)
class HeadAt:
    """A cut's head that runs at another precision than `CostInputs.head_precision` (its int8 head failed the
    accuracy gate): "mixed" (`float_nodes` stay fp32: their fp32 times, and their weights at 4 bytes rather than
    1) or "fp32" (every head node at its fp32 time, every weight at 4 bytes). `fp32_edge_ms`: the edge's fp32
    per-node times of those nodes."""

    precision: str
    float_nodes: frozenset[str]
    fp32_edge_ms: Mapping[str, float]


@dataclass(frozen=True)
class CostInputs:
    """Per-node costs on each side, what a cut adds on each side, and the edge's power model."""

    edge_ms: Mapping[str, float]
    cloud_ms: Mapping[str, float]
    edge_overhead_ms: float = 0.0
    cloud_overhead_ms: float = 0.0
    edge_boundary: BoundaryRates | None = None
    cloud_boundary: BoundaryRates | None = None
    # the part of c(v) that converted v's output back from the blocked layout in the full run (R of the docstring)
    cloud_reorder_out_ms: Mapping[str, float] = field(default_factory=dict)
    edge_active_w: float = 5.0
    edge_idle_w: float = 1.0
    codec: str = "int8"  # the one codec of every cut when `codecs` is None; the search's codec otherwise
    head_precision: str = "int8"
    codecs: CodecCosts | None = None  # the codecs each cut is costed under (module docstring)
    # cut id -> the precision its exported head runs at, where its int8 gate failed (`HeadAt`)
    heads: Mapping[str, HeadAt] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codec not in CODEC_ITEMSIZE:
            raise ValueError(f"codec must be one of {sorted(CODEC_ITEMSIZE)}, got {self.codec!r}")


@dataclass(frozen=True)
class Candidate:
    """One cut with its simulated costs."""

    id: str
    cut: tuple[str, ...]
    edge_nodes: AbstractSet[str] = field(repr=False)  # a frozenset, or a TopoPrefix (equal to one)
    edge_ms: float
    transfer_bytes: int
    transfer_ms: float
    cloud_ms: float
    total_ms: float
    edge_memory_bytes: int
    energy_mj: float
    feasible: bool = True
    violations: tuple[str, ...] = ()
    measured: bool = False  # edge_ms / cloud_ms are the timed head and tail, not the per-node sums
    predicted_edge_ms: float | None = None  # when measured: what the formula predicted
    predicted_cloud_ms: float | None = None
    codec: str | None = None  # what the cut tensors are sent with (None: nothing is sent)
    encode_ms: float = 0.0  # the codec on the device
    decode_ms: float = 0.0  # the codec in the cloud
    # every codec costed for this cut at this link: (option, transfer_ms, total_ms), the chosen one among them
    codec_options: tuple[tuple[CodecOption, float, float], ...] = field(default=(), repr=False)
    codecs_rejected: Mapping[str, str] = field(default_factory=dict, repr=False)  # spec -> why (accuracy gate)

    def objective_value(self, objective: str) -> float:
        """The value the planner minimises."""
        return rank_key(self, objective)[0]

    def record(self) -> CandidateRecord:
        """The plan.json record (times rounded to 4 decimals)."""
        predicted = None
        if self.measured:
            predicted = {"edge_ms": round(self.predicted_edge_ms or 0.0, 4),
                         "cloud_ms": round(self.predicted_cloud_ms or 0.0, 4)}
        options = {o.codec: {"transfer_bytes": o.up_bytes, "encode_ms": round(o.encode_ms, 4),
                             "decode_ms": round(o.decode_ms, 4), "transfer_ms": round(t_ms, 4),
                             "total_ms": round(total, 4)}
                   for o, t_ms, total in self.codec_options if o.codec is not None}
        return CandidateRecord(
            self.id, tuple(self.cut), len(self.edge_nodes), round(self.edge_ms, 4), self.transfer_bytes,
            round(self.transfer_ms, 4), round(self.cloud_ms, 4), round(self.total_ms, 4), self.edge_memory_bytes,
            round(self.energy_mj, 4), self.feasible, tuple(self.violations), self.measured, predicted,
            codec=self.codec, encode_ms=round(self.encode_ms, 4), decode_ms=round(self.decode_ms, 4),
            codecs=options if len(options) > 1 else None, codecs_rejected=dict(self.codecs_rejected) or None,
        )

    def to_json(self) -> dict:
        """The plan.json form."""
        return self.record().to_json()


@dataclass(frozen=True)
class Plan:
    """The planner's result: every candidate, the chosen one, and the best cut per uplink bandwidth."""

    candidates: tuple[Candidate, ...]
    chosen: str
    link: Link
    budgets: Budgets
    feasible: bool
    plan_table: tuple[tuple[float, str], ...] = ()
    table_codecs: tuple[str | None, ...] = ()  # the codec of each plan-table row's cut at that row's rate

    def candidate(self, cut_id: str) -> Candidate:
        """The candidate with id `cut_id`."""
        for cand in self.candidates:
            if cand.id == cut_id:
                return cand
        raise KeyError(f"no candidate {cut_id!r}")

    @property
    def measured(self) -> tuple[str, ...]:
        """Ids of the candidates whose compute was timed rather than predicted."""
        return tuple(c.id for c in self.candidates if c.measured)

    @property
    def best(self) -> Candidate:
        """The chosen candidate."""
        return self.candidate(self.chosen)

    def explain_infeasible(self) -> str:
        """Which budgets fail and the closest plan, in one paragraph."""
        best = self.best
        return (
            f"no cut meets the budgets; the closest plan is {best.id} ({', '.join(best.violations)}). "
            "Relax the named budget or pick another device or network."
        )


# -- simulation ---------------------------------------------------------------------------------------


def wire_bytes(graph: CutGraph, tensor: str, codec: str, ratio: float = 1.0) -> int:
    """Bytes of one tensor on the wire: float tensors under the codec's quantizer, others raw; a compressed
    codec's payload times `ratio` (compressed / uncompressed, as measured)."""
    info = graph.tensors[tensor]
    quantizer, _, compression = codec.partition("+")
    payload = info.numel * CODEC_ITEMSIZE[quantizer] if info.is_float else info.nbytes
    if compression:
        payload = math.ceil(payload * ratio)
    if quantizer == "int8c" and info.is_float and len(info.shape) >= 2:
        payload += 8 * info.shape[1]  # a float scale and an int32 zero point per channel
    return TENSOR_OVERHEAD_BYTES + payload


def _codec_fits(graph: CutGraph, cut: Sequence[str], codec: str, unquantizable: frozenset[str] = frozenset()
                ) -> bool:
    """Whether every cut tensor can be sent with `codec` (int8c needs channels: rank >= 2; int8 and int8c no
    tensor with non-finite values)."""
    if codec.startswith("int8") and unquantizable.intersection(cut):
        return False
    if not codec.startswith("int8c"):
        return True
    return all(len(graph.tensors[t].shape) >= 2 for t in cut if graph.tensors[t].is_float)


def _codec_options(graph: CutGraph, cut: Sequence[str], costs: CostInputs, cut_id: str | None
                   ) -> tuple[tuple[CodecOption, ...], Mapping[str, str]]:
    """Every codec `cut` may be sent with under `costs.codecs`, and those the accuracy gate rejected."""
    codecs = costs.codecs
    assert codecs is not None
    denied = codecs.denied.get(cut_id, {}) if cut_id is not None else {}
    options = []
    for spec, enc in codecs.encode.items():
        if spec in denied or not _codec_fits(graph, cut, spec, codecs.unquantizable):
            continue
        dec, ratios = codecs.decode[spec], codecs.ratios.get(spec, {})
        up = MSG_OVERHEAD_BYTES + sum(wire_bytes(graph, t, spec, ratios.get(t, 1.0)) for t in cut)
        timed_enc, timed_dec = codecs.tensor_encode.get(spec, {}), codecs.tensor_decode.get(spec, {})
        enc_ms = sum(timed_enc.get(t, enc.ms(graph.tensors[t].nbytes)) for t in cut)
        dec_ms = sum(timed_dec.get(t, dec.ms(graph.tensors[t].nbytes)) for t in cut)
        options.append(CodecOption(spec, up, enc_ms, dec_ms))
    if not options:  # every lossy codec rejected and fp32 not offered: raw floats always pass
        options.append(CodecOption("fp32", MSG_OVERHEAD_BYTES + sum(wire_bytes(graph, t, "fp32") for t in cut)))
    return tuple(options), dict(denied)


def _download_bytes(graph: CutGraph) -> int:
    return MSG_OVERHEAD_BYTES + sum(TENSOR_OVERHEAD_BYTES + graph.tensors[t].nbytes for t in graph.outputs)


def transfer_ms(up_bytes: int, down_bytes: int, link: Link) -> float:
    """Round trip plus serialisation at the link rates (Mbps -> bits per ms is * 1e3)."""
    return link.rtt_ms + 8.0 * up_bytes / (link.uplink_mbps * 1e3) + 8.0 * down_bytes / (link.downlink_mbps * 1e3)


def peak_activation_bytes(graph: CutGraph, edge_nodes: AbstractSet[str], cut: tuple[str, ...]) -> int:
    """Peak bytes of live tensors while the head runs in topological order (inputs and cut tensors held)."""
    remaining = {t: sum(1 for c in info.consumers if c in edge_nodes) for t, info in graph.tensors.items()}
    keep = set(cut) | set(graph.inputs)
    live = sum(graph.tensors[t].nbytes for t in graph.inputs)
    peak = live
    for node in graph.nodes:
        if node not in edge_nodes:
            continue
        made = graph.node_outputs[node]
        live += sum(graph.tensors[t].nbytes for t in made)
        peak = max(peak, live)
        for t in graph.node_inputs[node]:
            remaining[t] -= 1
            if remaining[t] == 0 and t not in keep:
                live -= graph.tensors[t].nbytes
        for t in made:
            if remaining.get(t, 0) == 0 and t not in keep:
                live -= graph.tensors[t].nbytes
    return peak


def _reorders(graph: CutGraph, tensors: Iterable[str], rates: BoundaryRates | None) -> float:
    """Layout conversions of the 4-D float tensors among `tensors`: one kernel each."""
    if rates is None or not rates.reorders:
        return 0.0
    return sum(rates.kernel_ms(graph.tensors[t].nbytes) for t in tensors
               if len(graph.tensors[t].shape) == 4 and graph.tensors[t].is_float)


def _unfused(graph: CutGraph, starts: Iterable[str], costs: CostInputs, side: Container[str] | None) -> list[str]:
    """U of the module docstring: 0-cost non-view nodes reached from `starts` through such nodes.

    `side`: the cloud nodes (None: every reader counts, as the search assumes).
    """
    found: list[str] = []
    stack = [c for t in starts for c in graph.tensors[t].consumers]
    while stack:
        v = stack.pop()
        if v in found or (side is not None and v not in side) or costs.cloud_ms.get(v, 0.0) > 0:
            continue
        if graph.node_ops.get(v, "") in VIEW_OPS:
            continue
        found.append(v)
        stack.extend(c for t in graph.node_outputs[v] for c in graph.tensors[t].consumers)
    return found


def _out_bytes(graph: CutGraph, node: str) -> int:
    return sum(graph.tensors[t].nbytes for t in graph.node_outputs[node])


def _cloud_extra(graph: CutGraph, tensors: Sequence[str], costs: CostInputs, side: Container[str] | None) -> float:
    """B_cloud for `tensors` crossing: their reorders plus the fused nodes they leave alone (`side`: see _unfused)."""
    rates = costs.cloud_boundary
    if rates is None:
        return 0.0
    alone = _unfused(graph, tensors, costs, side)
    return _reorders(graph, tensors, rates) + sum(rates.kernel_ms(_out_bytes(graph, v)) for v in alone)


def _moved_reorders(graph: CutGraph, cut: Sequence[str], costs: CostInputs, side: Container[str]) -> float:
    """R of the module docstring: reorders the full run charged to cloud readers of `cut` that the head does."""
    rates = costs.cloud_boundary
    if rates is None or not rates.reorders or not costs.cloud_reorder_out_ms:
        return 0.0
    readers = {c for t in cut for c in graph.tensors[t].consumers if c in side}
    return sum(min(costs.cloud_reorder_out_ms.get(v, 0.0), costs.cloud_ms.get(v, 0.0)) for v in readers
               if graph.node_ops.get(v, "") not in BLOCKED_LAYOUT_OPS)


def boundary_ms(
    graph: CutGraph, edge_nodes: AbstractSet[str], cut: Sequence[str], costs: CostInputs
) -> tuple[float, float]:
    """(B_edge, B_cloud) of the module docstring for a partial cut."""
    cloud_side = _Outside(edge_nodes)
    return (_reorders(graph, cut, costs.edge_boundary),
            _cloud_extra(graph, cut, costs, cloud_side) - _moved_reorders(graph, cut, costs, cloud_side))


class _Outside(Container[str]):
    """The graph's nodes not in an edge set (only ever asked about graph nodes), without listing them."""

    __slots__ = ("edge_nodes",)

    def __init__(self, edge_nodes: AbstractSet[str]) -> None:
        self.edge_nodes = edge_nodes

    def __contains__(self, node: object) -> bool:
        return node not in self.edge_nodes


class _Sums:
    """Per-node and per-tensor numbers looked up once per planning run.

    The float sums add the same numbers in the same order as the straightforward formula (over the edge set
    as iterated, and over the cloud nodes in topological order), so every candidate's numbers are bit for
    bit those of `evaluate_cut` on its own; only integer sums (bytes) use prefix sums.
    """

    def __init__(self, graph: CutGraph, costs: CostInputs) -> None:
        self.graph, self.codec = graph, costs.codec
        self._edge_get = costs.edge_ms.get
        self._cloud = [costs.cloud_ms.get(v, 0.0) for v in graph.nodes]
        self._cloud_of = dict(zip(graph.nodes, self._cloud))
        self._wire: dict[str, int] = {}
        self._weight_prefix: list[int] | None = None
        self.down_bytes = _download_bytes(graph)

    def edge(self, edge_nodes: AbstractSet[str]) -> float:
        """sum of e(v) over `edge_nodes`, in the set's own iteration order."""
        get = self._edge_get
        return sum([get(v, 0.0) for v in edge_nodes])

    def cloud(self, edge_nodes: AbstractSet[str], prefix: int | None) -> float:
        """sum of c(v) over the nodes not in `edge_nodes`, in topological order."""
        if prefix is not None:
            return sum(self._cloud[prefix:])
        return sum([c for v, c in self._cloud_of.items() if v not in edge_nodes])

    def weights(self, edge_nodes: AbstractSet[str], prefix: int | None) -> int:
        """fp32 weight bytes of `edge_nodes`."""
        if prefix is None:
            return sum(self.graph.node_weight_bytes[v] for v in edge_nodes)
        if self._weight_prefix is None:
            self._weight_prefix = [0, *itertools.accumulate(self.graph.node_weight_bytes[v] for v in self.graph.nodes)]
        return self._weight_prefix[prefix]

    def wire(self, tensor: str) -> int:
        """`wire_bytes` of `tensor` under the plan's codec."""
        got = self._wire.get(tensor)
        if got is None:
            got = self._wire[tensor] = wire_bytes(self.graph, tensor, self.codec)
        return got


class _Prefixes:
    """Cut tensors and peak activation memory of the topological prefixes, each in one sweep over the graph.

    Prefix k (the first k nodes on the edge) is cut by tensor t for k in [b(t), end(t)]: b(t) = 0 for a model
    input, else its producer's position + 1; end(t) = the last reader's position, or n for a model output
    made by a node. While a prefix's head runs, the live tensors after each node are those of the full
    model's run with the model outputs held (a tensor a later node reads is either still to be read in the
    head or crosses the cut, held either way), so its peak is the running maximum of that one run.
    """

    def __init__(self, graph: CutGraph) -> None:
        self.graph = graph
        self._peaks: list[int] | None = None

    def cuts(self, sizes: Iterable[int]) -> dict[int, tuple[str, ...]]:
        """The cut tensors of prefix k for each k in `sizes` (1 <= k <= n), as `CutGraph.cut_tensors` lists them."""
        graph, n = self.graph, len(self.graph.nodes)
        wanted = set(sizes)
        outputs = set(graph.outputs)
        rank = {t: i for i, t in enumerate(sorted(graph.tensors, key=graph.tensor_order))}
        born: dict[int, list[str]] = {}
        dies: dict[int, list[str]] = {}
        for name, info in graph.tensors.items():
            start = 0 if info.producer is None else graph.position(info.producer) + 1
            end = max((graph.position(c) for c in info.consumers), default=-1)
            if name in outputs and info.producer is not None:
                end = n
            if end >= max(start, 1):
                born.setdefault(start, []).append(name)
                dies.setdefault(end + 1, []).append(name)
        live: set[str] = set(born.get(0, ()))
        found = {}
        for k in range(1, max(wanted, default=0) + 1):
            live.update(born.get(k, ()))
            live.difference_update(dies.get(k, ()))
            if k in wanted:
                found[k] = tuple(sorted(live, key=rank.__getitem__))
        return found

    def peak(self, k: int) -> int:
        """`peak_activation_bytes` of prefix k (k >= 1), for a graph whose lists agree (`_consistent`)."""
        if self._peaks is None:
            self._peaks = self._running_peaks()
        return self._peaks[k - 1]

    def _running_peaks(self) -> list[int]:
        graph = self.graph
        keep = set(graph.inputs) | {t for t in graph.outputs if t in graph.tensors
                                    and graph.tensors[t].producer is not None}
        remaining = {t: len(info.consumers) for t, info in graph.tensors.items()}
        size = {t: info.nbytes for t, info in graph.tensors.items()}
        live = sum(size[t] for t in graph.inputs)
        peak, peaks = live, []
        for node in graph.nodes:
            made = graph.node_outputs[node]
            live += sum(size[t] for t in made)
            peak = max(peak, live)
            peaks.append(peak)
            for t in graph.node_inputs[node]:
                remaining[t] -= 1
                if remaining[t] == 0 and t not in keep:
                    live -= size[t]
            for t in made:
                if remaining.get(t, 0) == 0 and t not in keep:
                    live -= size[t]
        return peaks


def _consistent(graph: CutGraph) -> bool:
    """Whether each tensor's readers are exactly the nodes listing it as an input (once each): `_Prefixes` needs it."""
    reads = Counter((t, v) for v in graph.nodes for t in graph.node_inputs[v])
    listed = Counter((t, c) for t, info in graph.tensors.items() for c in info.consumers)
    return reads == listed


@dataclass(frozen=True)
class _LinkFree:
    """What a cut costs apart from the link: everything but transfer, energy, total and the budgets."""

    cut: tuple[str, ...]
    edge_nodes: AbstractSet[str]
    all_edge: bool
    edge_ms: float
    cloud_ms: float
    up_bytes: int
    down_bytes: int
    memory: int
    predicted: Mapping[str, Any]
    options: tuple[CodecOption, ...] = ()  # the codecs this cut may be sent with (one: no choice)
    rejected: Mapping[str, str] = field(default_factory=dict)


def _link_free(
    graph: CutGraph,
    edge_nodes: AbstractSet[str],
    costs: CostInputs,
    measured: tuple[float, float] | None,
    cut: tuple[str, ...],
    peak: Callable[[], int],
    sums: _Sums,
    prefix: int | None = None,
    cut_id: str | None = None,
) -> _LinkFree:
    """The link-independent part of `evaluate_cut` (`peak` is called only for a non-empty edge set).

    `prefix`: k when `edge_nodes` are the first k nodes in topological order (their sums are looked up).
    `cut_id`: the candidate's id, which the accuracy gate's rejections (`CodecCosts.denied`) and the heads that
    run at another precision (`CostInputs.heads`) are keyed by.
    """
    head = costs.heads.get(cut_id) if cut_id is not None and costs.heads else None
    if head is not None and edge_nodes and costs.head_precision == "int8":
        return _head_at(graph, edge_nodes, costs, head, measured, cut, peak, prefix, cut_id)
    all_edge = len(edge_nodes) == len(graph.nodes)
    edge_ms = costs.edge_overhead_ms + sums.edge(edge_nodes) if edge_nodes else 0.0
    if all_edge:
        up, cloud_ms = 0, 0.0
    else:
        up = MSG_OVERHEAD_BYTES + sum(sums.wire(t) for t in cut)
        cloud_ms = costs.cloud_overhead_ms + sums.cloud(edge_nodes, prefix)
        if edge_nodes:
            b_edge, b_cloud = boundary_ms(graph, edge_nodes, cut, costs)
            edge_ms, cloud_ms = edge_ms + b_edge, cloud_ms + b_cloud
    predicted: dict[str, Any] = {}
    if measured is not None:
        predicted = {"measured": True, "predicted_edge_ms": edge_ms, "predicted_cloud_ms": cloud_ms}
        edge_ms, cloud_ms = (float(ms) for ms in measured)
    weights = sums.weights(edge_nodes, prefix)
    if costs.head_precision == "int8":
        weights //= 4
    memory = weights + peak() if edge_nodes else 0
    rejected: Mapping[str, str] = {}
    if all_edge:
        options: tuple[CodecOption, ...] = (CodecOption(None, 0),)
    elif costs.codecs is None:
        options = (CodecOption(costs.codec, up),)
    else:
        options, rejected = _codec_options(graph, cut, costs, cut_id)
    return _LinkFree(cut, edge_nodes, all_edge, edge_ms, cloud_ms, up, sums.down_bytes, memory, predicted,
                     options, rejected)


def _head_at(graph: CutGraph, edge_nodes: AbstractSet[str], costs: CostInputs, head: HeadAt,
             measured: tuple[float, float] | None, cut: tuple[str, ...], peak: Callable[[], int], prefix: int | None,
             cut_id: str | None) -> _LinkFree:
    """`_link_free` for a head at `head.precision`: its float nodes at their fp32 times; fp32 weights counted at 4
    bytes (a mixed head's float nodes: 4 instead of 1). A timed head (refinement) keeps its timed compute."""
    floats = frozenset(edge_nodes) if head.precision == "fp32" else head.float_nodes & frozenset(edge_nodes)
    edge_ms = {**costs.edge_ms, **{v: head.fp32_edge_ms.get(v, costs.edge_ms.get(v, 0.0)) for v in floats}}
    at = replace(costs, edge_ms=edge_ms, heads={}, head_precision="fp32" if head.precision == "fp32" else "int8")
    base = _link_free(graph, edge_nodes, at, measured, cut, peak, _Sums(graph, at), prefix, cut_id)
    if head.precision == "fp32":
        return base
    return replace(base, memory=base.memory + sum(graph.node_weight_bytes.get(v, 0) for v in floats) * 3 // 4)


def _at_link(base: _LinkFree, costs: CostInputs, link: Link, budgets: Budgets, cut_id: str) -> Candidate:
    """The candidate of `base` on `link`: transfer, energy, total, and the budgets checked, with the codec that
    ranks best there when there is a choice (module docstring)."""
    if len(base.options) <= 1:
        option = base.options[0] if base.options else CodecOption(costs.codec, base.up_bytes)
        cand = _with_codec(base, costs, link, budgets, cut_id, option)
        return replace(cand, codecs_rejected=base.rejected) if base.rejected else cand
    each = [_with_codec(base, costs, link, budgets, cut_id, o) for o in base.options]
    best = rank(each, budgets)[0]
    return replace(best, codec_options=tuple((o, c.transfer_ms, c.total_ms) for o, c in zip(base.options, each)),
                   codecs_rejected=base.rejected)


def _with_codec(base: _LinkFree, costs: CostInputs, link: Link, budgets: Budgets, cut_id: str,
                option: CodecOption) -> Candidate:
    """The candidate of `base` on `link` sent with `option`'s codec."""
    up, edge_ms, cloud_ms = option.up_bytes, base.edge_ms, base.cloud_ms
    enc, dec = option.encode_ms, option.decode_ms
    t_ms = 0.0 if base.all_edge else transfer_ms(up, base.down_bytes, link)
    if enc or dec:
        energy = (costs.edge_active_w * (edge_ms + enc) + costs.edge_idle_w * (t_ms + dec + cloud_ms)
                  + link.tx_nj_per_byte * up * 1e-6)
        total = edge_ms + enc + t_ms + dec + cloud_ms
    else:  # the one-codec formula, term for term (bit for bit with earlier plans)
        energy = costs.edge_active_w * edge_ms + costs.edge_idle_w * (t_ms + cloud_ms) + link.tx_nj_per_byte * up * 1e-6
        total = edge_ms + t_ms + cloud_ms
    violations = _violations(total, base.memory, energy, budgets)
    return Candidate(cut_id, base.cut, base.edge_nodes, edge_ms, up, t_ms, cloud_ms, total, base.memory, energy,
                     not violations, violations, **base.predicted, codec=option.codec, encode_ms=enc, decode_ms=dec)


def evaluate_cut(
    graph: CutGraph,
    edge_nodes: AbstractSet[str],
    costs: CostInputs,
    link: Link,
    budgets: Budgets,
    cut_id: str,
    measured: tuple[float, float] | None = None,
) -> Candidate:
    """Simulate one cut with the formula in the module docstring and check it against the budgets.

    `measured` (edge_ms, cloud_ms), when given, replaces the two per-node sums (a timed head and tail).
    """
    cut = graph.cut_tensors(edge_nodes)
    base = _link_free(graph, edge_nodes, costs, measured, cut,
                      lambda: peak_activation_bytes(graph, edge_nodes, cut), _Sums(graph, costs), cut_id=cut_id)
    return _at_link(base, costs, link, budgets, cut_id)


def _violations(total_ms: float, memory: int, energy_mj: float, budgets: Budgets) -> tuple[str, ...]:
    violations = []
    if budgets.max_latency_ms is not None and total_ms > budgets.max_latency_ms:
        violations.append(f"latency {total_ms:.1f} ms > budget {budgets.max_latency_ms:g} ms")
    if budgets.edge_memory_mb is not None and memory > budgets.edge_memory_mb * 2**20:
        violations.append(f"edge memory {memory / 2**20:.1f} MB > budget {budgets.edge_memory_mb:g} MB")
    if budgets.max_energy_mj is not None and energy_mj > budgets.max_energy_mj:
        violations.append(f"energy {energy_mj:.1f} mJ > budget {budgets.max_energy_mj:g} mJ")
    return tuple(violations)


def _overshoot(cand: Candidate, budgets: Budgets) -> float:
    """Sum of relative budget overshoots: how far from feasible a candidate is."""
    pairs = [
        (cand.total_ms, budgets.max_latency_ms),
        (cand.edge_memory_bytes / 2**20, budgets.edge_memory_mb),
        (cand.energy_mj, budgets.max_energy_mj),
    ]
    return sum(max(0.0, value / limit - 1.0) for value, limit in pairs if limit)


# -- search -------------------------------------------------------------------------------------------


def min_cut_edge_set(
    graph: CutGraph, node_edge_w: Mapping[str, float], node_cloud_w: Mapping[str, float], tensor_w: Mapping[str, float]
) -> frozenset[str]:
    """The closed edge set minimising sum(edge weights) + sum(cloud weights) + sum(crossing tensor weights).

    Model outputs must be made in the cloud here (the edge-only baseline is evaluated separately), so at
    least the output producers are on the sink side.
    """
    net = _MinCut(graph)
    return net.solve(net.capacities(node_edge_w, node_cloud_w, tensor_w))


class _MinCut:
    """The s-t network of `min_cut_edge_set` for one graph, built once and solved for many weightings.

    Vertices: source 0 (edge), sink 1 (cloud), the nodes, one per tensor with several readers. Arcs: source
    -> v costs c(v), v -> sink costs e(v), producer -> tensor costs its weight, tensor -> reader and reader ->
    producer are infinite, and so is a model output's producer -> sink. A tensor with one reader is an arc
    producer -> reader costing its weight (the same cuts, and the same residual paths between nodes).
    Capacities are weights x 1e6 rounded to integers, so the max flow is exact. Augmenting paths along a
    search tree kept across pushes (`_augment`; on these graphs, where many nodes each take a little flow
    through one deep tree, far faster than Dinic's phases or networkx's push-relabel); a solve starts from
    the previous flow when that flow fits the new capacities (the search's weightings differ in tensor
    weights, which only grow as the uplink slows). The edge set is the nodes that cannot reach the sink in
    the residual network: the source side of the minimum cut nearest the sink, the same for every maximum
    flow (so the same as networkx's `minimum_cut` returned).
    """

    SCALE = 1e6  # integer capacities keep the max-flow exact

    def __init__(self, graph: CutGraph) -> None:
        self.nodes = graph.nodes
        index = {v: i + 2 for i, v in enumerate(graph.nodes)}
        arcs: dict[tuple[int, int], tuple[str, str] | None] = {}  # (tail, head) -> what sets its capacity
        direct: list[tuple[int, int, tuple[str, str]]] = []  # a tensor with one reader: producer -> reader
        for v in graph.nodes:
            arcs[(0, index[v])] = ("cloud", v)
            arcs[(index[v], 1)] = ("edge", v)
        count = 2 + len(graph.nodes)
        outputs = set(graph.outputs)
        for name, info in graph.tensors.items():
            producer = 0 if info.producer is None else index[info.producer]
            if len(info.consumers) == 1:  # its vertex would have one arc in and one infinite arc out: leave it out
                direct.append((producer, index[info.consumers[0]], ("tensor", name)))
                if info.producer is not None:
                    arcs[(index[info.consumers[0]], producer)] = None
            elif info.consumers:
                aux, count = count, count + 1
                arcs[(producer, aux)] = ("tensor", name)
                for c in info.consumers:
                    arcs[(aux, index[c])] = None  # None: infinite
                    if info.producer is not None:
                        arcs[(index[c], producer)] = None  # a cloud producer cannot feed an edge consumer
            if name in outputs and info.producer is not None:
                arcs[(producer, 1)] = None
        pairs = [*arcs.items(), *(((tail, head), kind) for tail, head, kind in direct)]
        self.kinds = [kind for _, kind in pairs]
        self.head: list[int] = []  # arc 2i runs tail -> head of pair i, arc 2i + 1 back
        self.adjacent: list[list[int]] = [[] for _ in range(count)]
        for i, ((tail, head), _) in enumerate(pairs):
            self.head += [head, tail]
            self.adjacent[tail].append(2 * i)
            self.adjacent[head].append(2 * i + 1)
        self.flow: list[int] | None = None  # the last solve's flow per pair, to start the next one from

    def capacities(self, node_edge_w: Mapping[str, float], node_cloud_w: Mapping[str, float],
                   tensor_w: Mapping[str, float]) -> tuple[int | None, ...]:
        """Integer capacity per arc pair (None: infinite) for one weighting."""
        scale, cloud, edge = self.SCALE, node_cloud_w.get, node_edge_w.get
        caps = tuple(None if kind is None else round(scale * (
            cloud(kind[1], 0.0) if kind[0] == "cloud" else edge(kind[1], 0.0) if kind[0] == "edge"
            else tensor_w[kind[1]])) for kind in self.kinds)
        low = min((c for c in caps if c is not None), default=0)
        if low < 0:
            raise ValueError(f"min-cut weights must be >= 0, got {low / scale}")
        return caps

    def solve(self, caps: Sequence[int | None]) -> frozenset[str]:
        """The edge set of the minimum cut under `caps` (from `capacities`)."""
        infinite = sum(c for c in caps if c is not None) + 1  # more than any cut of finite arcs
        full = [infinite if c is None else c for c in caps]
        flow = self.flow
        if flow is None or any(f > c for f, c in zip(flow, full)):
            flow = [0] * len(full)
        residual = [0] * (2 * len(full))
        residual[0::2] = [c - f for c, f in zip(full, flow)]
        residual[1::2] = flow
        while self._augment(residual):
            pass
        self.flow = residual[1::2]
        return self._source_side(residual)

    def _augment(self, residual: list[int]) -> bool:
        """One pass: grow a breadth-first tree from the source and push along tree path + arc to the sink from each
        vertex in turn, reusing the tree across pushes. A push that fills a tree arc cuts off the vertices below
        it until the next pass. False when the pass pushed nothing: then no augmenting path is left.
        """
        head, adjacent = self.head, self.adjacent
        size = len(adjacent)
        parent = [-1] * size  # the tree arc into each vertex
        seen = [False] * size
        seen[0] = seen[1] = True
        stamp, ok = [-1] * size, [False] * size  # memo of "the tree path to the source has room", per epoch
        epoch = 0

        def valid(u: int) -> bool:
            chain = []
            w = u
            while w != 0 and stamp[w] != epoch:
                arc = parent[w]
                if residual[arc] <= 0:
                    stamp[w], ok[w] = epoch, False
                    result = False
                    break
                chain.append(w)
                w = head[arc ^ 1]
            else:
                result = w == 0 or ok[w]
            for x in chain:
                stamp[x], ok[x] = epoch, result
            return result

        pushed = False
        queue = [0]
        for u in queue:
            if u and not valid(u):
                continue  # cut off by an earlier push in this pass
            for a in adjacent[u]:
                if residual[a] <= 0:
                    continue
                w = head[a]
                if w == 1:
                    push, x = residual[a], u
                    while x:
                        arc = parent[x]
                        push = min(push, residual[arc])
                        x = head[arc ^ 1]
                    residual[a] -= push
                    residual[a ^ 1] += push
                    x, cut_off = u, False
                    while x:
                        arc = parent[x]
                        residual[arc] -= push
                        residual[arc ^ 1] += push
                        cut_off = cut_off or residual[arc] == 0
                        x = head[arc ^ 1]
                    pushed = True
                    if cut_off:
                        epoch += 1
                        if not valid(u):
                            break
                elif not seen[w]:
                    seen[w] = True
                    parent[w] = a
                    queue.append(w)
        return pushed

    def _source_side(self, residual: list[int]) -> frozenset[str]:
        head, adjacent = self.head, self.adjacent
        reaches = [False] * len(adjacent)
        reaches[1] = True
        queue = [1]
        for w in queue:
            for b in adjacent[w]:  # b runs w -> u; b ^ 1 runs u -> w
                u = head[b]
                if not reaches[u] and residual[b ^ 1] > 0:
                    reaches[u] = True
                    queue.append(u)
        return frozenset(v for i, v in enumerate(self.nodes) if not reaches[i + 2])


def search_edge_sets(
    graph: CutGraph, costs: CostInputs, links: Iterable[Link], progress: SearchProgress | None = None
) -> list[AbstractSet[str]]:
    """Candidate edge sets: baselines, every topological prefix, and exact min-cuts per objective and link.

    The prefixes are `TopoPrefix` values (equal to the frozensets of their nodes, without holding the names).
    """
    links = list(links)
    n = len(graph.nodes)
    # Boundary terms per crossing tensor (module docstring); model inputs never cross a partial cut.
    made = [t for t, info in graph.tensors.items() if info.producer is not None]
    b_edge = dict.fromkeys(graph.tensors, 0.0) | {t: _reorders(graph, [t], costs.edge_boundary) for t in made}
    b_cloud = dict.fromkeys(graph.tensors, 0.0) | {t: _cloud_extra(graph, [t], costs, None) for t in made}
    wire = {t: wire_bytes(graph, t, costs.codec) for t in graph.tensors}
    net = _MinCut(graph)
    problems: list[tuple[int, float, tuple[int | None, ...]]] = []  # (objective, -uplink, capacities)
    for link in links:
        per_byte_ms = 8.0 / (link.uplink_mbps * 1e3)
        latency_t = {t: wire[t] * per_byte_ms + b_edge[t] + b_cloud[t] for t in graph.tensors}
        energy_t = {
            t: wire[t] * (per_byte_ms * costs.edge_idle_w + link.tx_nj_per_byte * 1e-6)
            + b_edge[t] * costs.edge_active_w + b_cloud[t] * costs.edge_idle_w
            for t in graph.tensors
        }
        bytes_t = {t: float(wire[t]) for t in graph.tensors}
        edge_e = {v: costs.edge_ms.get(v, 0.0) * costs.edge_active_w for v in graph.nodes}
        cloud_e = {v: costs.cloud_ms.get(v, 0.0) * costs.edge_idle_w for v in graph.nodes}
        weightings = [(costs.edge_ms, costs.cloud_ms, latency_t), (edge_e, cloud_e, energy_t)]
        tiny = {v: 1e-6 * costs.edge_ms.get(v, 0.0) for v in graph.nodes}
        weightings.append((tiny, {v: 1e-6 * costs.cloud_ms.get(v, 0.0) for v in graph.nodes}, bytes_t))
        for lam in (0.1, 1.0, 10.0):  # latency + lambda * energy: points along the trade-off
            def mix(a: Mapping[str, float], b: Mapping[str, float], lam: float = lam) -> dict[str, float]:
                return {k: a.get(k, 0.0) + lam * b.get(k, 0.0) for k in set(a) | set(b)}

            weightings.append((mix(costs.edge_ms, edge_e), mix(costs.cloud_ms, cloud_e), mix(latency_t, energy_t)))
        problems += [(i, -link.uplink_mbps, net.capacities(*w)) for i, w in enumerate(weightings)]
    # Each distinct weighting once, by objective and slowing uplink, so that each solve starts from the last flow.
    solved: dict[tuple[int | None, ...], frozenset[str]] = {}
    order = sorted(range(len(problems)), key=lambda i: problems[i][:2])
    distinct = len({p[2] for p in problems})
    for i in order:
        caps = problems[i][2]
        if caps not in solved:
            solved[caps] = net.solve(caps)
            if progress is not None:
                progress("min-cuts", len(solved), distinct)
    cuts = [solved[caps] for _, _, caps in problems]
    # Baselines, usable prefixes, then the min-cut sets not seen before: a min-cut set that is a prefix is that
    # prefix (kept, or left out with it: a prefix's usability is its set's).
    index = {v: i for i, v in enumerate(graph.nodes)}
    unique: dict[AbstractSet[str], None] = dict.fromkeys(s for s in (frozenset(), frozenset(graph.nodes))
                                                         if _usable(graph, s))
    found: list[AbstractSet[str]] = list(unique)
    found += [TopoPrefix(graph.nodes, index, k) for k in range(1, n) if _usable_prefix(graph, k)]
    for s in cuts:
        if 0 < len(s) < n and graph.last_position(s) == len(s) - 1:
            continue
        if s not in unique and _usable(graph, s):
            unique[s] = None
            found.append(s)
    return found


class TopoPrefix(AbstractSet[str]):
    """The first k nodes of a topological order as a read-only set that holds (order, positions, k), not k names.

    It is equal to, hashes as and iterates in the order of `frozenset(order[:k])` (so sums over it add the same
    numbers in the same order, bit for bit); set operations with it return frozensets. A plan keeps one per
    prefix candidate: n frozensets of up to n names each were the planner's O(n^2) memory.
    """

    __slots__ = ("order", "_position", "k", "_cached_hash")

    def __init__(self, order: tuple[str, ...], position: Mapping[str, int], k: int) -> None:
        self.order, self._position, self.k = order, position, k
        self._cached_hash: int | None = None

    def __len__(self) -> int:
        return self.k

    def __contains__(self, node: object) -> bool:
        at = self._position.get(node) if isinstance(node, str) else None
        return at is not None and at < self.k

    def __iter__(self) -> Iterator[str]:
        return iter(frozenset(self.order[: self.k]))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TopoPrefix) and other.order is self.order:
            return other.k == self.k
        return super().__eq__(other)

    def __hash__(self) -> int:
        if self._cached_hash is None:
            self._cached_hash = hash(frozenset(self.order[: self.k]))
        return self._cached_hash

    def __repr__(self) -> str:
        return f"TopoPrefix(first {self.k} of {len(self.order)} nodes)"

    def __reduce__(self) -> tuple[Any, ...]:
        return frozenset, (frozenset(self),)

    @classmethod
    def _from_iterable(cls, it: Iterable[_T]) -> frozenset[_T]:
        return frozenset(it)


def _usable_prefix(graph: CutGraph, size: int) -> bool:
    """`_usable` for the first `size` (0 < size < n) nodes: closed by construction; no model input (nor a shape
    value, `CutGraph.local_tensors`) may cross."""
    made = {t: graph.tensors[t].producer for t in (*graph.inputs, *graph.local_tensors)}
    return all(graph.position(c) < size for t, p in made.items() if p is None or graph.position(p) < size
               for c in graph.tensors[t].consumers)


def _usable(graph: CutGraph, edge_nodes: AbstractSet[str]) -> bool:
    """Closed, and no raw model input crosses a partial cut (the head would have to echo its own input)."""
    if not graph.is_closed(edge_nodes):
        return False
    if 0 < len(edge_nodes) < len(graph.nodes):
        return not set(graph.cut_tensors(edge_nodes)) & (set(graph.inputs) | graph.local_tensors)
    return True


def _candidate_id(graph: CutGraph, edge_nodes: AbstractSet[str], taken: set[str]) -> str:
    if not edge_nodes:
        return CLOUD_ONLY
    if len(edge_nodes) == len(graph.nodes):
        return EDGE_ONLY
    base = f"c{_last_position(graph, edge_nodes) + 1:03d}"
    cid, n = base, 1
    while cid in taken:
        n += 1
        cid = f"{base}-{n}"
    taken.add(cid)
    return cid


def rank(candidates: Iterable[Candidate], budgets: Budgets) -> list[Candidate]:
    """Best first: feasible ones by the objective (ties: lower latency, fewer bytes), then the rest by closeness."""
    def key(c: Candidate) -> tuple[float, float, int, str]:
        return rank_key(c, budgets.objective)

    cands = list(candidates)
    feasible = sorted((c for c in cands if c.feasible), key=key)
    return feasible + sorted((c for c in cands if not c.feasible), key=lambda c: (_overshoot(c, budgets),) + key(c))


def choose(candidates: Iterable[Candidate], budgets: Budgets) -> tuple[Candidate, bool]:
    """The best feasible candidate by the objective (ties: lower latency, fewer bytes), else the closest."""
    best = rank(candidates, budgets)[0]
    return best, best.feasible


def _evaluate_all(
    graph: CutGraph,
    edge_sets: Mapping[str, AbstractSet[str]],
    costs: CostInputs,
    measured: Mapping[str, tuple[float, float]],
    progress: SearchProgress | None = None,
) -> list[tuple[str, _LinkFree]]:
    """The link-independent costs of every edge set (id -> nodes), as `evaluate_cut` computes them.

    Topological prefixes (most candidates) take their cut tensors and peak memory from `_Prefixes`; the
    others are simulated one by one.
    """
    sums, prefixes = _Sums(graph, costs), _Prefixes(graph)
    fast_peak = _consistent(graph)
    sizes = {cid: _prefix_size(graph, s) for cid, s in edge_sets.items()}
    cuts = prefixes.cuts(k for k in sizes.values() if k)
    bases = []
    step = max(1, len(edge_sets) // 20)
    for done, (cid, s) in enumerate(edge_sets.items(), 1):
        k = sizes[cid]
        cut = cuts[k] if k else graph.cut_tensors(s)

        def peak(s: AbstractSet[str] = s, cut: tuple[str, ...] = cut, k: int | None = k) -> int:
            return prefixes.peak(k) if k and fast_peak else peak_activation_bytes(graph, s, cut)

        bases.append((cid, _link_free(graph, s, costs, measured.get(cid), cut, peak, sums, k, cid)))
        if progress is not None and (done % step == 0 or done == len(edge_sets)):
            progress("simulating", done, len(edge_sets))
    return bases


def _prefix_size(graph: CutGraph, edge_nodes: AbstractSet[str]) -> int | None:
    """k when `edge_nodes` are the first k nodes in topological order, else None."""
    k = len(edge_nodes)
    return k if _last_position(graph, edge_nodes) == k - 1 else None


def _last_position(graph: CutGraph, edge_nodes: AbstractSet[str]) -> int:
    """`graph.last_position(edge_nodes)`, at once for a prefix of the graph's order."""
    if isinstance(edge_nodes, TopoPrefix) and _is_prefix_of(edge_nodes, graph):
        return edge_nodes.k - 1
    return graph.last_position(edge_nodes)


def _is_prefix_of(prefix: TopoPrefix, graph: CutGraph) -> bool:
    return prefix.order is graph.nodes or prefix.order == graph.nodes


def _decide(
    graph: CutGraph,
    edge_sets: Mapping[str, AbstractSet[str]],
    costs: CostInputs,
    link: Link,
    budgets: Budgets,
    table_mbps: Iterable[float],
    measured: Mapping[str, tuple[float, float]],
    progress: SearchProgress | None = None,
) -> Plan:
    """Simulate the edge sets (id -> nodes), choose under the budgets, and tabulate the best cut per uplink.

    Compute and memory do not depend on the link: they are simulated once, and only transfer, energy,
    total and the budgets are worked out again at each plan-table rate.
    """
    bases = _evaluate_all(graph, edge_sets, costs, measured, progress)
    candidates = tuple(_at_link(b, costs, link, budgets, cid) for cid, b in bases)
    best, feasible = choose(candidates, budgets)
    table, codecs = [], []
    for m in table_mbps:
        at_rate = replace(link, uplink_mbps=m)
        row = choose([_at_link(b, costs, at_rate, budgets, cid) for cid, b in bases], budgets)[0]
        table.append((m, row.id))
        codecs.append(row.codec)
    return Plan(candidates, best.id, link, budgets, feasible, tuple(table), tuple(codecs))


def plan_cuts(
    graph: CutGraph,
    costs: CostInputs,
    link: Link,
    budgets: Budgets = Budgets(),
    table_mbps: Iterable[float] = PLAN_TABLE_MBPS,
    progress: SearchProgress | None = None,
) -> Plan:
    """Search the cuts, simulate each, choose under the budgets, and tabulate the best cut per uplink.

    `progress(what, done, total)` is called as the search goes (min-cuts solved, candidates simulated).
    """
    table_mbps = tuple(sorted(set(table_mbps)))
    links = [link, *(replace(link, uplink_mbps=m) for m in table_mbps)]
    edge_sets = search_edge_sets(graph, costs, links, progress)
    taken: set[str] = set()
    ids = {_candidate_id(graph, s, taken): s for s in _in_id_order(edge_sets)}
    return _decide(graph, ids, costs, link, budgets, table_mbps, {}, progress)


def _in_id_order(edge_sets: Iterable[AbstractSet[str]]) -> list[AbstractSet[str]]:
    """The sets by size, then by their sorted node names (compared only between sets of the same size)."""
    by_size: dict[int, list[AbstractSet[str]]] = {}
    for s in edge_sets:
        by_size.setdefault(len(s), []).append(s)
    ordered: list[AbstractSet[str]] = []
    for size in sorted(by_size):
        group = by_size[size]
        ordered += group if len(group) == 1 else sorted(group, key=sorted)
    return ordered


def apply_measured(
    plan: Plan, graph: CutGraph, costs: CostInputs, measured: Mapping[str, tuple[float, float]]
) -> Plan:
    """`plan` with timed (edge_ms, cloud_ms) for the candidates in `measured`, chosen and tabulated again.

    Candidates already timed in `plan` keep their timings unless `measured` gives new ones; the prediction
    recorded on each timed candidate is always the formula's, from `costs`. Link, budgets and plan-table
    rates are the plan's.
    """
    known = {c.id for c in plan.candidates}
    unknown = sorted(set(measured) - known)
    if unknown:
        raise KeyError(f"measured timings for {unknown}, which are not candidates of this plan ({sorted(known)})")
    timings = {c.id: (c.edge_ms, c.cloud_ms) for c in plan.candidates if c.measured}
    timings.update(measured)
    edge_sets = {c.id: c.edge_nodes for c in plan.candidates}
    return _decide(graph, edge_sets, costs, plan.link, plan.budgets, [m for m, _ in plan.plan_table], timings)
