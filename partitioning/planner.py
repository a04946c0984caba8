"""The planner: a pure function from per-node costs, network and budgets to a frozen Plan.

Cost of a cut, where E is the set of nodes run on the edge (closed under predecessors: data only flows
edge -> cloud) and C = crossing tensors (made on the edge or model inputs, read in the cloud):

    edge_ms     = o_edge + sum_{v in E} e(v) + B_edge                      (0 when E is empty)
    up_bytes    = MSG + sum_{t in C} (TENSOR + wire(t))           wire(t): t's bytes under the plan's codec
    down_bytes  = MSG + sum_{t in outputs} (TENSOR + bytes(t))    results come back as fp32
    transfer_ms = rtt + 8 * up_bytes / uplink + 8 * down_bytes / downlink      (0 for edge-only)
    cloud_ms    = o_cloud + sum_{v not in E} c(v) + B_cloud                (0 for edge-only)
    total_ms    = edge_ms + transfer_ms + cloud_ms
    energy_mj   = P_active * edge_ms + P_idle * (transfer_ms + cloud_ms) + e_tx * up_bytes
    memory      = weights of E (int8: fp32 bytes / 4) + peak live activations while the head runs

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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from models.manifest import CLOUD_ONLY, CODECS, EDGE_ONLY, OBJECTIVES, BudgetsRecord, CandidateRecord, rank_key
from partitioning.costtypes import BoundaryRates
from partitioning.flops import VIEW_OPS
from partitioning.graph import CutGraph

__all__ = ["OBJECTIVES", "EDGE_ONLY", "CLOUD_ONLY", "BoundaryRates", "Link", "Budgets", "CostInputs", "Candidate",
           "Plan", "plan_cuts", "apply_measured", "evaluate_cut", "rank", "choose", "search_edge_sets",
           "min_cut_edge_set", "wire_bytes", "transfer_ms", "peak_activation_bytes", "boundary_ms"]
# Ops that onnxruntime runs in the blocked layout even when their input arrives plain (it reorders it first);
# any other op fed a plain cut tensor runs plain.
BLOCKED_LAYOUT_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"})
CODEC_ITEMSIZE = dict(zip(CODECS, (4, 2, 1, 1)))  # bytes per float element on the wire under each codec
MSG_OVERHEAD_BYTES = 64  # request framing: ids, model, cut, timestamps
TENSOR_OVERHEAD_BYTES = 32  # per tensor: name, dtype, shape, quantization parameters
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
    codec: str = "int8"
    head_precision: str = "int8"

    def __post_init__(self) -> None:
        if self.codec not in CODEC_ITEMSIZE:
            raise ValueError(f"codec must be one of {sorted(CODEC_ITEMSIZE)}, got {self.codec!r}")


@dataclass(frozen=True)
class Candidate:
    """One cut with its simulated costs."""

    id: str
    cut: tuple[str, ...]
    edge_nodes: frozenset[str] = field(repr=False)
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

    def objective_value(self, objective: str) -> float:
        """The value the planner minimises."""
        return rank_key(self, objective)[0]

    def record(self) -> CandidateRecord:
        """The plan.json record (times rounded to 4 decimals)."""
        predicted = None
        if self.measured:
            predicted = {"edge_ms": round(self.predicted_edge_ms or 0.0, 4),
                         "cloud_ms": round(self.predicted_cloud_ms or 0.0, 4)}
        return CandidateRecord(
            self.id, tuple(self.cut), len(self.edge_nodes), round(self.edge_ms, 4), self.transfer_bytes,
            round(self.transfer_ms, 4), round(self.cloud_ms, 4), round(self.total_ms, 4), self.edge_memory_bytes,
            round(self.energy_mj, 4), self.feasible, tuple(self.violations), self.measured, predicted,
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


def wire_bytes(graph: CutGraph, tensor: str, codec: str) -> int:
    """Bytes of one tensor on the wire: float tensors under the codec, others raw."""
    info = graph.tensors[tensor]
    payload = info.numel * CODEC_ITEMSIZE[codec] if info.is_float else info.nbytes
    return TENSOR_OVERHEAD_BYTES + payload


def _upload_bytes(graph: CutGraph, cut: Iterable[str], codec: str) -> int:
    return MSG_OVERHEAD_BYTES + sum(wire_bytes(graph, t, codec) for t in cut)


def _download_bytes(graph: CutGraph) -> int:
    return MSG_OVERHEAD_BYTES + sum(TENSOR_OVERHEAD_BYTES + graph.tensors[t].nbytes for t in graph.outputs)


def transfer_ms(up_bytes: int, down_bytes: int, link: Link) -> float:
    """Round trip plus serialisation at the link rates (Mbps -> bits per ms is * 1e3)."""
    return link.rtt_ms + 8.0 * up_bytes / (link.uplink_mbps * 1e3) + 8.0 * down_bytes / (link.downlink_mbps * 1e3)


def peak_activation_bytes(graph: CutGraph, edge_nodes: frozenset[str], cut: tuple[str, ...]) -> int:
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


def _unfused(graph: CutGraph, starts: Iterable[str], costs: CostInputs, side: frozenset[str] | None) -> list[str]:
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


def _cloud_extra(graph: CutGraph, tensors: Sequence[str], costs: CostInputs, side: frozenset[str] | None) -> float:
    """B_cloud for `tensors` crossing: their reorders plus the fused nodes they leave alone (`side`: see _unfused)."""
    rates = costs.cloud_boundary
    if rates is None:
        return 0.0
    alone = _unfused(graph, tensors, costs, side)
    return _reorders(graph, tensors, rates) + sum(rates.kernel_ms(_out_bytes(graph, v)) for v in alone)


def _moved_reorders(graph: CutGraph, cut: Sequence[str], costs: CostInputs, side: frozenset[str]) -> float:
    """R of the module docstring: reorders the full run charged to cloud readers of `cut` that the head does."""
    rates = costs.cloud_boundary
    if rates is None or not rates.reorders or not costs.cloud_reorder_out_ms:
        return 0.0
    readers = {c for t in cut for c in graph.tensors[t].consumers if c in side}
    return sum(min(costs.cloud_reorder_out_ms.get(v, 0.0), costs.cloud_ms.get(v, 0.0)) for v in readers
               if graph.node_ops.get(v, "") not in BLOCKED_LAYOUT_OPS)


def boundary_ms(
    graph: CutGraph, edge_nodes: frozenset[str], cut: Sequence[str], costs: CostInputs
) -> tuple[float, float]:
    """(B_edge, B_cloud) of the module docstring for a partial cut."""
    cloud_side = frozenset(graph.nodes) - edge_nodes
    return (_reorders(graph, cut, costs.edge_boundary),
            _cloud_extra(graph, cut, costs, cloud_side) - _moved_reorders(graph, cut, costs, cloud_side))


def evaluate_cut(
    graph: CutGraph,
    edge_nodes: frozenset[str],
    costs: CostInputs,
    link: Link,
    budgets: Budgets,
    cut_id: str,
    measured: tuple[float, float] | None = None,
) -> Candidate:
    """Simulate one cut with the formula in the module docstring and check it against the budgets.

    `measured` (edge_ms, cloud_ms), when given, replaces the two per-node sums (a timed head and tail).
    """
    all_edge = len(edge_nodes) == len(graph.nodes)
    cut = graph.cut_tensors(edge_nodes)
    edge_ms = costs.edge_overhead_ms + sum(costs.edge_ms.get(v, 0.0) for v in edge_nodes) if edge_nodes else 0.0
    if all_edge:
        up, t_ms, cloud_ms = 0, 0.0, 0.0
    else:
        up = _upload_bytes(graph, cut, costs.codec)
        t_ms = transfer_ms(up, _download_bytes(graph), link)
        cloud_ms = costs.cloud_overhead_ms + sum(costs.cloud_ms.get(v, 0.0) for v in graph.nodes if v not in edge_nodes)
        if edge_nodes:
            b_edge, b_cloud = boundary_ms(graph, edge_nodes, cut, costs)
            edge_ms, cloud_ms = edge_ms + b_edge, cloud_ms + b_cloud
    predicted: dict[str, Any] = {}
    if measured is not None:
        predicted = {"measured": True, "predicted_edge_ms": edge_ms, "predicted_cloud_ms": cloud_ms}
        edge_ms, cloud_ms = (float(ms) for ms in measured)
    weights = sum(graph.node_weight_bytes[v] for v in edge_nodes)
    if costs.head_precision == "int8":
        weights //= 4
    memory = weights + peak_activation_bytes(graph, edge_nodes, cut) if edge_nodes else 0
    energy = costs.edge_active_w * edge_ms + costs.edge_idle_w * (t_ms + cloud_ms) + link.tx_nj_per_byte * up * 1e-6
    cand = Candidate(cut_id, cut, edge_nodes, edge_ms, up, t_ms, cloud_ms, edge_ms + t_ms + cloud_ms, memory, energy,
                     **predicted)
    return replace(cand, **_check_budgets(cand, budgets))


def _check_budgets(cand: Candidate, budgets: Budgets) -> dict:
    violations = []
    if budgets.max_latency_ms is not None and cand.total_ms > budgets.max_latency_ms:
        violations.append(f"latency {cand.total_ms:.1f} ms > budget {budgets.max_latency_ms:g} ms")
    if budgets.edge_memory_mb is not None and cand.edge_memory_bytes > budgets.edge_memory_mb * 2**20:
        violations.append(
            f"edge memory {cand.edge_memory_bytes / 2**20:.1f} MB > budget {budgets.edge_memory_mb:g} MB"
        )
    if budgets.max_energy_mj is not None and cand.energy_mj > budgets.max_energy_mj:
        violations.append(f"energy {cand.energy_mj:.1f} mJ > budget {budgets.max_energy_mj:g} mJ")
    return {"feasible": not violations, "violations": tuple(violations)}


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
    import networkx as nx  # lazily: only the profile extra needs it

    inf = float("inf")
    scale = 1e6  # integer capacities keep the max-flow exact
    g = nx.DiGraph()
    src, sink = "__edge__", "__cloud__"
    for v in graph.nodes:
        g.add_edge(src, v, capacity=round(node_cloud_w.get(v, 0.0) * scale))
        g.add_edge(v, sink, capacity=round(node_edge_w.get(v, 0.0) * scale))
    for name, info in graph.tensors.items():
        producer = info.producer or src
        if info.consumers:
            aux = ("tensor", name)
            g.add_edge(producer, aux, capacity=round(tensor_w[name] * scale))
            for c in info.consumers:
                g.add_edge(aux, c, capacity=inf)
                if info.producer is not None:
                    g.add_edge(c, info.producer, capacity=inf)  # a cloud producer cannot feed an edge consumer
        if name in graph.outputs and info.producer is not None:
            g.add_edge(info.producer, sink, capacity=inf)
    _, (source_side, _) = nx.minimum_cut(g, src, sink)
    return frozenset(v for v in graph.nodes if v in source_side)


def search_edge_sets(graph: CutGraph, costs: CostInputs, links: Iterable[Link]) -> list[frozenset[str]]:
    """Candidate edge sets: baselines, every topological prefix, and exact min-cuts per objective and link."""
    sets: list[frozenset[str]] = [frozenset(), frozenset(graph.nodes)]
    sets += [frozenset(graph.nodes[:k]) for k in range(1, len(graph.nodes))]
    # Boundary terms per crossing tensor (module docstring); model inputs never cross a partial cut.
    made = [t for t, info in graph.tensors.items() if info.producer is not None]
    b_edge = dict.fromkeys(graph.tensors, 0.0) | {t: _reorders(graph, [t], costs.edge_boundary) for t in made}
    b_cloud = dict.fromkeys(graph.tensors, 0.0) | {t: _cloud_extra(graph, [t], costs, None) for t in made}
    for link in links:
        per_byte_ms = 8.0 / (link.uplink_mbps * 1e3)
        latency_t = {t: wire_bytes(graph, t, costs.codec) * per_byte_ms + b_edge[t] + b_cloud[t] for t in graph.tensors}
        energy_t = {
            t: wire_bytes(graph, t, costs.codec) * (per_byte_ms * costs.edge_idle_w + link.tx_nj_per_byte * 1e-6)
            + b_edge[t] * costs.edge_active_w + b_cloud[t] * costs.edge_idle_w
            for t in graph.tensors
        }
        bytes_t = {t: float(wire_bytes(graph, t, costs.codec)) for t in graph.tensors}
        edge_e = {v: costs.edge_ms.get(v, 0.0) * costs.edge_active_w for v in graph.nodes}
        cloud_e = {v: costs.cloud_ms.get(v, 0.0) * costs.edge_idle_w for v in graph.nodes}
        sets.append(min_cut_edge_set(graph, costs.edge_ms, costs.cloud_ms, latency_t))
        sets.append(min_cut_edge_set(graph, edge_e, cloud_e, energy_t))
        tiny = {v: 1e-6 * costs.edge_ms.get(v, 0.0) for v in graph.nodes}
        sets.append(min_cut_edge_set(graph, tiny, {v: 1e-6 * costs.cloud_ms.get(v, 0.0) for v in graph.nodes}, bytes_t))
        for lam in (0.1, 1.0, 10.0):  # latency + lambda * energy: points along the trade-off
            def mix(a: Mapping[str, float], b: Mapping[str, float], lam: float = lam) -> dict[str, float]:
                return {k: a.get(k, 0.0) + lam * b.get(k, 0.0) for k in set(a) | set(b)}

            sets.append(min_cut_edge_set(graph, mix(costs.edge_ms, edge_e), mix(costs.cloud_ms, cloud_e),
                                         mix(latency_t, energy_t)))
    unique: dict[frozenset[str], None] = {}
    for s in sets:
        if _usable(graph, s):
            unique.setdefault(s, None)
    return list(unique)


def _usable(graph: CutGraph, edge_nodes: frozenset[str]) -> bool:
    """Closed, and no raw model input crosses a partial cut (the head would have to echo its own input)."""
    if not graph.is_closed(edge_nodes):
        return False
    if 0 < len(edge_nodes) < len(graph.nodes):
        return not set(graph.cut_tensors(edge_nodes)) & set(graph.inputs)
    return True


def _candidate_id(graph: CutGraph, edge_nodes: frozenset[str], taken: set[str]) -> str:
    if not edge_nodes:
        return CLOUD_ONLY
    if len(edge_nodes) == len(graph.nodes):
        return EDGE_ONLY
    base = f"c{max(graph.position(v) for v in edge_nodes) + 1:03d}"
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
    edge_sets: Mapping[str, frozenset[str]],
    costs: CostInputs,
    link: Link,
    budgets: Budgets,
    measured: Mapping[str, tuple[float, float]],
) -> tuple[Candidate, ...]:
    return tuple(evaluate_cut(graph, s, costs, link, budgets, cid, measured.get(cid)) for cid, s in edge_sets.items())


def _decide(
    graph: CutGraph,
    edge_sets: Mapping[str, frozenset[str]],
    costs: CostInputs,
    link: Link,
    budgets: Budgets,
    table_mbps: Iterable[float],
    measured: Mapping[str, tuple[float, float]],
) -> Plan:
    """Simulate the edge sets (id -> nodes), choose under the budgets, and tabulate the best cut per uplink."""
    candidates = _evaluate_all(graph, edge_sets, costs, link, budgets, measured)
    best, feasible = choose(candidates, budgets)
    table = []
    for m in table_mbps:
        at_rate = _evaluate_all(graph, edge_sets, costs, replace(link, uplink_mbps=m), budgets, measured)
        table.append((m, choose(at_rate, budgets)[0].id))
    return Plan(candidates, best.id, link, budgets, feasible, tuple(table))


def plan_cuts(
    graph: CutGraph,
    costs: CostInputs,
    link: Link,
    budgets: Budgets = Budgets(),
    table_mbps: Iterable[float] = PLAN_TABLE_MBPS,
) -> Plan:
    """Search the cuts, simulate each, choose under the budgets, and tabulate the best cut per uplink."""
    table_mbps = tuple(sorted(set(table_mbps)))
    edge_sets = search_edge_sets(graph, costs, [link, *(replace(link, uplink_mbps=m) for m in table_mbps)])
    taken: set[str] = set()
    ids = {_candidate_id(graph, s, taken): s for s in sorted(edge_sets, key=lambda s: (len(s), sorted(s)))}
    return _decide(graph, ids, costs, link, budgets, table_mbps, {})


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
