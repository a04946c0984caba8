"""The planner's fast search against the straightforward computation it replaced, on zoo models and random DAGs.

The `ref_*` functions below are the planner as it was before the search was made fast (issue 17), kept
verbatim: every candidate simulated on its own for the run and again for each plan-table rate, each peak
memory by a walk over the whole graph, each min-cut by networkx. The fast planner must give the same plan
(every candidate's numbers bit for bit, the chosen cut, the plan table); and the work it does must grow
about linearly with the graph (counted calls, never wall-clock).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import pytest

from benchmarks.planning_time import synthetic_graph
from partitioning import planner
from partitioning.graph import CutGraph, TensorInfo
from partitioning.planner import (
    CLOUD_ONLY,
    EDGE_ONLY,
    MSG_OVERHEAD_BYTES,
    PLAN_TABLE_MBPS,
    BoundaryRates,
    Budgets,
    Candidate,
    CostInputs,
    Link,
    Plan,
    _cloud_extra,
    _download_bytes,
    _reorders,
    apply_measured,
    boundary_ms,
    choose,
    plan_cuts,
    transfer_ms,
    wire_bytes,
)

# -- the reference: partitioning/planner.py before the fast search, verbatim ---------------------------------


def ref_peak_activation_bytes(graph: CutGraph, edge_nodes: frozenset[str], cut: tuple[str, ...]) -> int:
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



def ref_evaluate_cut(
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
        up = MSG_OVERHEAD_BYTES + sum(wire_bytes(graph, t, costs.codec) for t in cut)
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
    memory = weights + ref_peak_activation_bytes(graph, edge_nodes, cut) if edge_nodes else 0
    energy = costs.edge_active_w * edge_ms + costs.edge_idle_w * (t_ms + cloud_ms) + link.tx_nj_per_byte * up * 1e-6
    cand = Candidate(cut_id, cut, edge_nodes, edge_ms, up, t_ms, cloud_ms, edge_ms + t_ms + cloud_ms, memory, energy,
                     **predicted, codec=None if all_edge else costs.codec)  # one codec for every cut: no choice
    return replace(cand, **ref_check_budgets(cand, budgets))


def ref_check_budgets(cand: Candidate, budgets: Budgets) -> dict:
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



def ref_min_cut_edge_set(
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


def ref_search_edge_sets(graph: CutGraph, costs: CostInputs, links: Iterable[Link]) -> list[frozenset[str]]:
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
        sets.append(ref_min_cut_edge_set(graph, costs.edge_ms, costs.cloud_ms, latency_t))
        sets.append(ref_min_cut_edge_set(graph, edge_e, cloud_e, energy_t))
        tiny = {v: 1e-6 * costs.edge_ms.get(v, 0.0) for v in graph.nodes}
        tiny_cloud = {v: 1e-6 * costs.cloud_ms.get(v, 0.0) for v in graph.nodes}
        sets.append(ref_min_cut_edge_set(graph, tiny, tiny_cloud, bytes_t))
        for lam in (0.1, 1.0, 10.0):  # latency + lambda * energy: points along the trade-off
            def mix(a: Mapping[str, float], b: Mapping[str, float], lam: float = lam) -> dict[str, float]:
                return {k: a.get(k, 0.0) + lam * b.get(k, 0.0) for k in set(a) | set(b)}

            sets.append(ref_min_cut_edge_set(graph, mix(costs.edge_ms, edge_e), mix(costs.cloud_ms, cloud_e),
                                         mix(latency_t, energy_t)))
    unique: dict[frozenset[str], None] = {}
    for s in sets:
        if ref_usable(graph, s):
            unique.setdefault(s, None)
    return list(unique)



def ref_usable(graph: CutGraph, edge_nodes: frozenset[str]) -> bool:
    """Closed, and no raw model input crosses a partial cut (the head would have to echo its own input)."""
    if not graph.is_closed(edge_nodes):
        return False
    if 0 < len(edge_nodes) < len(graph.nodes):
        return not set(graph.cut_tensors(edge_nodes)) & set(graph.inputs)
    return True


def ref_candidate_id(graph: CutGraph, edge_nodes: frozenset[str], taken: set[str]) -> str:
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



def ref_evaluate_all(
    graph: CutGraph,
    edge_sets: Mapping[str, frozenset[str]],
    costs: CostInputs,
    link: Link,
    budgets: Budgets,
    measured: Mapping[str, tuple[float, float]],
) -> tuple[Candidate, ...]:
    return tuple(ref_evaluate_cut(graph, s, costs, link, budgets, cid, measured.get(cid))
                 for cid, s in edge_sets.items())


def ref_decide(
    graph: CutGraph,
    edge_sets: Mapping[str, frozenset[str]],
    costs: CostInputs,
    link: Link,
    budgets: Budgets,
    table_mbps: Iterable[float],
    measured: Mapping[str, tuple[float, float]],
) -> Plan:
    """Simulate the edge sets (id -> nodes), choose under the budgets, and tabulate the best cut per uplink."""
    candidates = ref_evaluate_all(graph, edge_sets, costs, link, budgets, measured)
    best, feasible = choose(candidates, budgets)
    table, codecs = [], []
    for m in table_mbps:
        at_rate = ref_evaluate_all(graph, edge_sets, costs, replace(link, uplink_mbps=m), budgets, measured)
        row = choose(at_rate, budgets)[0]
        table.append((m, row.id))
        codecs.append(row.codec)
    return Plan(candidates, best.id, link, budgets, feasible, tuple(table), tuple(codecs))


def ref_plan_cuts(
    graph: CutGraph,
    costs: CostInputs,
    link: Link,
    budgets: Budgets = Budgets(),
    table_mbps: Iterable[float] = PLAN_TABLE_MBPS,
) -> Plan:
    """Search the cuts, simulate each, choose under the budgets, and tabulate the best cut per uplink."""
    table_mbps = tuple(sorted(set(table_mbps)))
    edge_sets = ref_search_edge_sets(graph, costs, [link, *(replace(link, uplink_mbps=m) for m in table_mbps)])
    taken: set[str] = set()
    ids = {ref_candidate_id(graph, s, taken): s for s in sorted(edge_sets, key=lambda s: (len(s), sorted(s)))}
    return ref_decide(graph, ids, costs, link, budgets, table_mbps, {})




# -- graphs -------------------------------------------------------------------------------------------------

OPS = ("Conv", "Relu", "Add", "Reshape", "MaxPool", "Concat", "Gemm")


def random_dag(seed: int, n: int) -> tuple[CutGraph, CostInputs]:
    """A random DAG: one or two model inputs, 1-3 readers per node, 4-D or flat tensors, one or two outputs, and
    costs drawn from a few round values (0 included) so that ties between cuts are common."""
    rng = random.Random(seed)
    inputs = ["x"] if rng.random() < 0.7 else ["x", "y"]
    names = [f"v{i}" for i in range(n)]
    reads: dict[str, tuple[str, ...]] = {}
    for i, v in enumerate(names):
        pool = inputs + names[:i]
        recent = pool[-4:]
        picks = {rng.choice(recent)} | {rng.choice(pool) for _ in range(rng.randint(0, 2))}
        reads[v] = tuple(sorted(picks))
    outputs = [names[-1]] + ([names[-2]] if rng.random() < 0.3 else [])
    readers: dict[str, list[str]] = {}
    for v in names:
        for t in reads[v]:
            readers.setdefault(t, []).append(v)

    def shape() -> tuple[int, ...]:
        return (1, rng.choice((1, 4, 8)), rng.choice((2, 7)), rng.choice((2, 7))) if rng.random() < 0.7 else \
            (rng.choice((10, 1000, 50_000)),)

    tensors = {t: TensorInfo(t, None if t in inputs else t, tuple(readers.get(t, ())), shape(), "float32")
               for t in inputs + names}
    graph = CutGraph(tuple(names), reads, {v: rng.choice((0, 400, 4000)) for v in names}, tensors, tuple(inputs),
                     tuple(outputs), {v: rng.choice(OPS) for v in names})
    values = (0.0, 0.25, 0.5, 1.0, 2.0)
    edge = {v: rng.choice(values) for v in names}
    cloud = {v: rng.choice(values) / 4 for v in names}
    boundary = rng.random() < 0.6
    costs = CostInputs(
        edge, cloud, edge_overhead_ms=rng.choice((0.0, 1.0)), cloud_overhead_ms=rng.choice((0.0, 0.5)),
        edge_boundary=BoundaryRates(0.01, 2.0) if boundary else None,
        cloud_boundary=BoundaryRates(0.002, 50.0, rng.random() < 0.7) if boundary else None,
        cloud_reorder_out_ms={v: 0.05 for v in names if rng.random() < 0.3},
        codec=rng.choice(("int8", "fp16", "fp32")), head_precision=rng.choice(("int8", "fp32")),
    )
    return graph, costs


LINKS = (Link(10.0, 20.0, 40.0, 100.0), Link(2.0, 5.0, 80.0), Link(200.0, 300.0, 5.0, 10.0))
BUDGETS = (Budgets(), Budgets(objective="energy"), Budgets(objective="bytes"),
           Budgets(max_latency_ms=60.0, edge_memory_mb=0.05), Budgets(max_energy_mj=30.0, objective="latency"))


def assert_same_plan(graph: CutGraph, costs: CostInputs, link: Link, budgets: Budgets) -> Plan:
    fast = plan_cuts(graph, costs, link, budgets)
    reference = ref_plan_cuts(graph, costs, link, budgets)
    assert [c.id for c in fast.candidates] == [c.id for c in reference.candidates]
    for mine, theirs in zip(fast.candidates, reference.candidates):
        assert mine == theirs, mine.id  # every number bit for bit, the cut tensors, the budgets' verdicts
    assert (fast.chosen, fast.plan_table, fast.feasible) == (reference.chosen, reference.plan_table, reference.feasible)
    assert fast == reference
    return fast


# -- the same plans -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_dags_plan_as_the_reference(seed):
    graph, costs = random_dag(seed, n=8 + 3 * seed)
    assert_same_plan(graph, costs, LINKS[seed % 3], BUDGETS[seed % len(BUDGETS)])


@pytest.mark.parametrize("seed", range(3))
def test_synthetic_nets_plan_as_the_reference(seed):
    graph, costs = synthetic_graph(60 + 30 * seed, seed=seed)
    plan = assert_same_plan(graph, costs, LINKS[seed], BUDGETS[seed])
    assert len(plan.candidates) >= len(graph.nodes)  # every prefix (none reads the input late here)


def test_timed_candidates_are_chosen_as_the_reference_would():
    graph, costs = synthetic_graph(80, seed=5)
    plan = plan_cuts(graph, costs, LINKS[0])
    timings = {c.id: (c.edge_ms * 0.7, c.cloud_ms * 1.3) for c in plan.candidates[::7]}
    edge_sets = {c.id: c.edge_nodes for c in plan.candidates}
    reference = ref_decide(graph, edge_sets, costs, plan.link, plan.budgets, [m for m, _ in plan.plan_table], timings)
    assert apply_measured(plan, graph, costs, timings) == reference


@pytest.mark.parametrize("seed", range(20))
def test_min_cut_is_networkx_min_cut(seed):
    graph, _ = random_dag(100 + seed, n=10 + seed)
    rng = random.Random(seed)
    whole = (0.0, 1.0, 2.0, 3.0)  # round numbers: many minimum cuts of equal weight, the nearest-sink one wins
    edge = {v: rng.choice(whole) for v in graph.nodes}
    cloud = {v: rng.choice(whole) for v in graph.nodes}
    tensor = {t: rng.choice(whole) * rng.choice((1.0, 1e-3)) for t in graph.tensors}
    assert planner.min_cut_edge_set(graph, edge, cloud, tensor) == ref_min_cut_edge_set(graph, edge, cloud, tensor)


@pytest.mark.slow
@pytest.mark.needs_profile
@pytest.mark.parametrize("name, which", [("tiny_cnn", 0), ("resnet18", 1), ("vit_tiny", 0)])
def test_zoo_models_plan_as_the_reference(zoo_onnx, name, which):
    onnx = pytest.importorskip("onnx")
    from partitioning.device_profile import resolve_device
    from partitioning.devices import resolve_gpu
    from partitioning.estimate import estimate_node_costs
    from partitioning.graph import build_cut_graph

    model = onnx.load(str(zoo_onnx(name)))
    edge = estimate_node_costs(model, resolve_device("rpi4"), precision="int8")
    cloud = estimate_node_costs(model, resolve_gpu("t4"), precision="fp32")
    costs = CostInputs(dict(edge.per_node_ms), dict(cloud.per_node_ms), edge.overhead_ms, cloud.overhead_ms,
                       edge.boundary, cloud.boundary, edge_active_w=6.0, edge_idle_w=2.0)
    graph = build_cut_graph(model)
    link, budgets = ((Link(10.0, 20.0, 40.0, 100.0), Budgets()),
                     (Link(2.0, 5.0, 80.0), Budgets(objective="energy")))[which]
    assert_same_plan(graph, costs, link, budgets)


# -- how the work grows, counted --------------------------------------------------------------------------------


def test_work_grows_about_linearly_and_progress_is_reported(monkeypatch):
    calls = {"peak": 0, "solve": 0, "numel": 0}
    real_peak, real_solve = planner.peak_activation_bytes, planner._MinCut.solve

    def peak(*args):
        calls["peak"] += 1
        return real_peak(*args)

    def solve(self, caps):
        calls["solve"] += 1
        return real_solve(self, caps)

    monkeypatch.setattr(planner, "peak_activation_bytes", peak)
    monkeypatch.setattr(planner._MinCut, "solve", solve)
    graph, costs = synthetic_graph(1000, seed=1)
    seen: list[tuple[str, int, int]] = []
    plan = plan_cuts(graph, costs, LINKS[0], progress=lambda what, done, total: seen.append((what, done, total)))
    prefixes = sum(1 for c in plan.candidates if c.id not in (EDGE_ONLY, CLOUD_ONLY) and "-" not in c.id
                   and int(c.id[1:]) == len(c.edge_nodes))
    assert prefixes >= len(graph.nodes) - 2
    # peak memory is walked over the whole graph only for the few candidates that are not topological prefixes
    assert calls["peak"] <= len(plan.candidates) - prefixes
    # one max-flow per distinct weighting (6 objectives x 12 links at most; "bytes" is the same on every link)
    assert calls["solve"] <= 6 * (1 + len(PLAN_TABLE_MBPS)) - len(PLAN_TABLE_MBPS)
    # every tensor's size is computed once, however many candidates read it
    assert all("nbytes" in vars(t) for t in graph.tensors.values())
    for what in ("min-cuts", "simulating"):
        mine = [(done, total) for w, done, total in seen if w == what]
        assert mine and mine[-1][0] == mine[-1][1]
        assert [d for d, _ in mine] == sorted(d for d, _ in mine)
    assert len(seen) <= 200  # a bounded number of reports, not one per candidate


# -- progress and nodes costed blind ------------------------------------------------------------------------------


def test_search_progress_is_said_at_most_once_a_second(monkeypatch):
    from partitioning import api

    clock = [100.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    said: list[str] = []
    report = api._every_second(said.append)
    for step in range(1, 31):  # 30 reports, 0.25 s apart: 7.5 s in all
        clock[0] += 0.25
        report("min-cuts", step, 30)
    assert said == [f"  searching cuts: min-cuts {k}/30" for k in (4, 8, 12, 16, 20, 24, 28)]


def unknown_shape_model(path, symbolic: bool):
    """x -> Conv -> Gelu (com.microsoft: onnx cannot infer it) -> Conv -> Relu -> Conv: no value_info, so static
    shape inference stops at the Gelu; onnxruntime runs it all."""
    np = pytest.importorskip("numpy")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 1, 1)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Gelu", ["a"], ["b"], name="gelu", domain="com.microsoft"),
        helper.make_node("Conv", ["b", "w2"], ["c"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["d"], name="relu"),
        helper.make_node("Conv", ["d", "w3"], ["y"], name="conv3"),
    ]
    dims = ["N", 3, "H", "W"] if symbolic else ["N", 3, 16, 16]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])], weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.needs_profile
@pytest.mark.parametrize("symbolic", [False, True])
def test_nodes_of_unknown_work_are_counted_and_said(tmp_path, capsys, symbolic):
    from models.manifest import PlanDocument
    from partitioning.cli import main

    path = unknown_shape_model(tmp_path / "m.onnx", symbolic)
    shape = ["--input-shape", "1x3x16x16"] if symbolic else []
    assert main([str(path), "--device", "rpi4", "--cloud", "t4", "--json", *shape]) == 0
    out, err = capsys.readouterr()
    # conv1 is known; gelu, conv2 and conv3 are not (relu is fused into conv2 by the runtime: 0 either way)
    lines = [line for line in err.splitlines() if "could not determine" in line]
    assert len(lines) == 1 and lines[0].startswith("split-profile: warning: 3 of 5 nodes"), err
    assert "gelu (Gelu)" in lines[0] and "conv2 (Conv)" in lines[0]
    doc = json.loads(out)
    assert doc["model"]["uncosted_nodes"] == {"count": 3, "examples": ["gelu", "conv2", "conv3"]}
    assert PlanDocument.from_json(doc).model.uncosted_nodes.count == 3


@pytest.mark.needs_profile
def test_a_fully_known_graph_says_nothing_and_measured_costs_record_nothing(capsys):
    from partitioning.cli import main

    assert main(["tiny_cnn", "--device", "rpi4", "--cloud", "t4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "could not determine" not in err
    assert json.loads(out)["model"]["uncosted_nodes"] == {"count": 0, "examples": []}


def test_plan_json_without_uncosted_nodes_still_loads():
    from models.plandoc import ModelRecord, TensorSpec, UncostedNodes

    record = ModelRecord("m", "m.onnx", "onnx", "a" * 64, "b" * 64, "classification",
                         (TensorSpec("x", (None, 3), "float32"),), (TensorSpec("y", (None, 2), "float32"),), 5)
    old = record.to_json()
    assert "uncosted_nodes" not in old  # not checked: not written, as before
    assert ModelRecord.from_json(old) == record
    marked = replace(record, uncosted_nodes=UncostedNodes(3, ("a", "b")))
    assert ModelRecord.from_json(json.loads(json.dumps(marked.to_json()))) == marked


# -- memory: the prefixes hold no node sets ---------------------------------------------------------------------


def test_a_topological_prefix_is_the_frozenset_of_its_nodes():
    graph, _ = synthetic_graph(60, seed=2)
    index = {v: i for i, v in enumerate(graph.nodes)}
    for k in (1, 7, 31, 59):
        prefix, plain = planner.TopoPrefix(graph.nodes, index, k), frozenset(graph.nodes[:k])
        assert prefix == plain and plain == prefix and hash(prefix) == hash(plain) and len(prefix) == k
        assert list(prefix) == list(plain)  # the same iteration order: float sums over it are bit for bit the same
        assert graph.nodes[k - 1] in prefix and graph.nodes[k] not in prefix and "no such node" not in prefix
        assert prefix != frozenset(graph.nodes[:k - 1]) and prefix != planner.TopoPrefix(graph.nodes, index, k + 1)
        rest = frozenset(graph.nodes) - prefix
        assert type(rest) is frozenset and rest == frozenset(graph.nodes[k:])
        assert type(prefix | {"x"}) is frozenset and {plain: 1}[prefix] == 1
        assert graph.cut_tensors(prefix) == graph.cut_tensors(plain)


def test_prefix_candidates_keep_no_node_sets_and_memory_grows_linearly():
    import tracemalloc

    peaks = []
    for nodes in (250, 500):
        graph, costs = synthetic_graph(nodes, seed=3)
        tracemalloc.start()
        plan = plan_cuts(graph, costs, LINKS[0])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        prefixes = [c for c in plan.candidates if isinstance(c.edge_nodes, planner.TopoPrefix)]
        assert len(prefixes) >= nodes - 2
    # frozensets of every prefix made it ~n^1.7 (x3.2 for twice the nodes); one (order, k) per prefix: ~x2
    assert peaks[1] / peaks[0] < 2.5, peaks
