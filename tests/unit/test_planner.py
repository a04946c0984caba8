"""The planner on hand-made graphs and costs: its choice equals a brute-force search over all closed cuts."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from partitioning.graph import CutGraph, TensorInfo
from partitioning.planner import (
    CLOUD_ONLY,
    EDGE_ONLY,
    BoundaryRates,
    Budgets,
    CostInputs,
    Link,
    apply_measured,
    evaluate_cut,
    plan_cuts,
)


def make_graph(edges: dict[str, list[str]], sizes: dict[str, int], outputs: list[str]) -> CutGraph:
    """A graph from {node: [input tensors]}; node n makes tensor n; 'x' is the model input."""
    consumers: dict[str, list[str]] = {}
    for node, ins in edges.items():
        for t in ins:
            consumers.setdefault(t, []).append(node)
    tensors = {"x": TensorInfo("x", None, tuple(consumers.get("x", ())), (sizes["x"],), "float32")}
    for node in edges:
        tensors[node] = TensorInfo(node, node, tuple(consumers.get(node, ())), (sizes[node],), "float32")
    return CutGraph(
        nodes=tuple(edges),
        node_inputs={n: tuple(ins) for n, ins in edges.items()},
        node_weight_bytes={n: 1000 for n in edges},
        tensors=tensors,
        inputs=("x",),
        outputs=tuple(outputs),
    )


def brute_force(graph: CutGraph, costs: CostInputs, link: Link, budgets: Budgets):
    """Every closed edge set, simulated; the best feasible by the objective."""
    best = None
    for r in range(len(graph.nodes) + 1):
        for combo in itertools.combinations(graph.nodes, r):
            s = frozenset(combo)
            if not graph.is_closed(s):
                continue
            if 0 < len(s) < len(graph.nodes) and set(graph.cut_tensors(s)) & set(graph.inputs):
                continue
            cand = evaluate_cut(graph, s, costs, link, budgets, "bf")
            if not cand.feasible:
                continue
            value = cand.objective_value(budgets.objective)
            if best is None or value < best[0] - 1e-9:
                best = (value, s)
    return best


# Two branches after a stem: a (huge output) and b (tiny output), joined by d.
BRANCHES = {"stem": ["x"], "a": ["stem"], "b": ["stem"], "a2": ["a"], "d": ["a2", "b"], "head": ["d"]}
BRANCH_SIZES = {"x": 150_000, "stem": 200_000, "a": 400_000, "b": 1_000, "a2": 500, "d": 2_000, "head": 10}


def test_chain_picks_the_small_activation_when_the_link_is_slow():
    graph = make_graph({"n1": ["x"], "n2": ["n1"], "n3": ["n2"], "n4": ["n3"]},
                       {"x": 100_000, "n1": 200_000, "n2": 1_000, "n3": 50_000, "n4": 10}, ["n4"])
    costs = CostInputs(edge_ms={"n1": 5, "n2": 5, "n3": 40, "n4": 40}, cloud_ms={"n1": 1, "n2": 1, "n3": 2, "n4": 2})
    plan = plan_cuts(graph, costs, Link(uplink_mbps=2, downlink_mbps=10, rtt_ms=10))
    assert plan.best.edge_nodes == frozenset({"n1", "n2"})
    assert plan.best.cut == ("n2",)
    # a very fast link makes cloud-only best; a dead-slow one makes edge-only best
    fast = plan_cuts(graph, costs, Link(uplink_mbps=10_000, downlink_mbps=10_000, rtt_ms=0.1))
    assert fast.chosen == CLOUD_ONLY
    slow = plan_cuts(graph, costs, Link(uplink_mbps=0.01, downlink_mbps=0.01, rtt_ms=500))
    assert slow.chosen == EDGE_ONLY


def test_best_cut_is_not_a_topological_prefix():
    # Branch a is cheap on the edge and slow in the cloud and shrinks its data; branch b is the reverse.
    # The optimum runs stem, a, a2 on the edge and sends two tensors (stem's for b, a2's for d): no prefix
    # of the node order is that set, so a prefix-only search (Neurosurgeon) cannot find it.
    graph = make_graph(BRANCHES, {**BRANCH_SIZES, "stem": 1_000}, ["head"])
    costs = CostInputs(
        edge_ms={"stem": 1, "a": 1, "b": 30, "a2": 1, "d": 30, "head": 30},
        cloud_ms={"stem": 0.1, "a": 20, "b": 0.1, "a2": 20, "d": 0.1, "head": 0.1},
    )
    link = Link(uplink_mbps=5, downlink_mbps=20, rtt_ms=20)
    plan = plan_cuts(graph, costs, link)
    value, best_set = brute_force(graph, costs, link, Budgets())
    assert plan.best.total_ms == pytest.approx(value)
    assert plan.best.edge_nodes == best_set == frozenset({"stem", "a", "a2"})
    prefixes = {frozenset(graph.nodes[:k]) for k in range(len(graph.nodes) + 1)}
    assert best_set not in prefixes
    assert set(plan.best.cut) == {"stem", "a2"}  # a multi-tensor cut: stem's output to b, a2's to d


@pytest.mark.parametrize("seed", range(12))
def test_planner_equals_brute_force_on_random_dags(seed):
    rng = random.Random(seed)
    n = rng.randint(4, 9)
    names = [f"v{i}" for i in range(n)]
    edges: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        pool = ["x"] if i == 0 else names[:i]
        k = rng.randint(1, min(2, len(pool)))
        edges[name] = rng.sample(pool, k) if i else ["x"]
    sizes = {"x": rng.randint(10_000, 300_000), **{v: rng.choice([100, 5_000, 80_000, 400_000]) for v in names}}
    # every sink node is an output, so every node matters
    consumed = {t for ins in edges.values() for t in ins}
    outputs = [v for v in names if v not in consumed]
    graph = make_graph(edges, sizes, outputs)
    costs = CostInputs(
        edge_ms={v: rng.uniform(0.5, 30) for v in names},
        cloud_ms={v: rng.uniform(0.05, 3) for v in names},
        edge_active_w=rng.uniform(2, 10),
        edge_idle_w=rng.uniform(0.2, 2),
    )
    link = Link(uplink_mbps=rng.choice([1.1, 5.85, 18.88, 100]), downlink_mbps=50, rtt_ms=rng.uniform(5, 60),
                tx_nj_per_byte=rng.uniform(50, 500))
    for objective in ("latency", "energy"):
        budgets = Budgets(objective=objective)
        plan = plan_cuts(graph, costs, link, budgets)
        value, _ = brute_force(graph, costs, link, budgets)
        assert plan.best.objective_value(objective) == pytest.approx(value, rel=1e-6)


def test_budgets_make_the_planner_pick_a_feasible_cut_and_name_failures():
    graph = make_graph(BRANCHES, BRANCH_SIZES, ["head"])
    costs = CostInputs(edge_ms={v: 2 for v in BRANCHES}, cloud_ms={v: 0.5 for v in BRANCHES})
    link = Link(uplink_mbps=18.88, downlink_mbps=50, rtt_ms=20)
    unconstrained = plan_cuts(graph, costs, link)
    limit = unconstrained.best.edge_memory_bytes / 2**20 * 0.5
    constrained = plan_cuts(graph, costs, link, Budgets(edge_memory_mb=limit))
    assert constrained.feasible
    assert constrained.best.edge_memory_bytes <= limit * 2**20
    value, _ = brute_force(graph, costs, link, Budgets(edge_memory_mb=limit))
    assert constrained.best.total_ms == pytest.approx(value)

    impossible = plan_cuts(graph, costs, link, Budgets(max_latency_ms=0.001))
    assert not impossible.feasible
    assert impossible.best.violations and "latency" in impossible.best.violations[0]
    assert "closest plan" in impossible.explain_infeasible()


def test_plan_table_moves_toward_the_cloud_as_bandwidth_grows():
    graph = make_graph({"n1": ["x"], "n2": ["n1"], "n3": ["n2"], "n4": ["n3"]},
                       {"x": 100_000, "n1": 200_000, "n2": 1_000, "n3": 50_000, "n4": 10}, ["n4"])
    costs = CostInputs(edge_ms={"n1": 5, "n2": 5, "n3": 40, "n4": 40}, cloud_ms={"n1": 1, "n2": 1, "n3": 2, "n4": 2})
    plan = plan_cuts(graph, costs, Link(uplink_mbps=2, downlink_mbps=10, rtt_ms=10), table_mbps=(0.05, 2, 10_000))
    table = dict(plan.plan_table)
    edge_count = {c.id: len(c.edge_nodes) for c in plan.candidates}
    assert edge_count[table[0.05]] >= edge_count[table[2]] >= edge_count[table[10_000]]
    assert table[10_000] == CLOUD_ONLY


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="objective"):
        Budgets(objective="speed")
    with pytest.raises(ValueError, match="positive"):
        Budgets(max_latency_ms=-1)
    with pytest.raises(ValueError, match="uplink"):
        Link(uplink_mbps=0, downlink_mbps=1, rtt_ms=1)
    with pytest.raises(ValueError, match="codec"):
        CostInputs(edge_ms={}, cloud_ms={}, codec="jpeg")


# A near-tie: edge-only takes 4.0 ms, cloud-only 3.0 ms of compute plus ~1.01 ms of link; every middle cut is
# slower than both. A few percent of error in either prediction decides the choice.
NEAR_TIE = {"n1": ["x"], "n2": ["n1"], "n3": ["n2"], "n4": ["n3"]}
NEAR_TIE_SIZES = {"x": 1_000, "n1": 1_000, "n2": 1_000, "n3": 1_000, "n4": 10}


def near_tie(budgets: Budgets = Budgets(), table_mbps=(0.001, 1000.0)):
    graph = make_graph(NEAR_TIE, NEAR_TIE_SIZES, ["n4"])
    costs = CostInputs(edge_ms={v: 1.0 for v in NEAR_TIE}, cloud_ms={v: 0.75 for v in NEAR_TIE},
                       edge_active_w=5.0, edge_idle_w=1.0)
    link = Link(uplink_mbps=1000, downlink_mbps=1000, rtt_ms=1.0, tx_nj_per_byte=100.0)
    return graph, costs, link, plan_cuts(graph, costs, link, budgets, table_mbps)


def test_timed_compute_flips_a_near_tie_and_keeps_the_prediction():
    graph, costs, link, plan = near_tie()
    assert plan.chosen == EDGE_ONLY and not plan.measured
    cloud_only = plan.candidate(CLOUD_ONLY)
    assert cloud_only.total_ms - plan.best.total_ms < 0.05  # within ~1%: a near-tie

    refined = apply_measured(plan, graph, costs, {EDGE_ONLY: (4.3, 0.0), CLOUD_ONLY: (0.0, 2.9)})
    assert refined.chosen == CLOUD_ONLY and refined.feasible
    assert set(refined.measured) == {EDGE_ONLY, CLOUD_ONLY}
    timed = refined.candidate(CLOUD_ONLY)
    assert (timed.edge_ms, timed.cloud_ms) == (0.0, 2.9)
    assert (timed.predicted_edge_ms, timed.predicted_cloud_ms) == (0.0, pytest.approx(3.0))
    # transfer and memory unchanged; total and energy follow the formula with the timed compute
    assert timed.transfer_bytes == cloud_only.transfer_bytes and timed.transfer_ms == cloud_only.transfer_ms
    assert timed.edge_memory_bytes == cloud_only.edge_memory_bytes
    assert timed.total_ms == pytest.approx(timed.transfer_ms + 2.9)
    assert timed.energy_mj == pytest.approx(1.0 * (timed.transfer_ms + 2.9) + 100.0 * timed.transfer_bytes * 1e-6)
    edge_only = refined.candidate(EDGE_ONLY)
    assert edge_only.total_ms == pytest.approx(4.3) and edge_only.energy_mj == pytest.approx(5.0 * 4.3)
    assert edge_only.predicted_edge_ms == pytest.approx(4.0)
    # the untimed candidates are as the formula made them
    for cand in plan.candidates:
        if cand.id not in (EDGE_ONLY, CLOUD_ONLY):
            assert refined.candidate(cand.id) == cand and not cand.measured
    doc = timed.to_json()
    assert doc["measured"] is True and doc["predicted"] == {"edge_ms": 0.0, "cloud_ms": 3.0}
    assert doc["cloud_ms"] == 2.9
    assert plan.candidate("c002").to_json()["measured"] is False and "predicted" not in plan.candidate("c002").to_json()


def test_timings_accumulate_and_unknown_ids_are_refused():
    graph, costs, _, plan = near_tie()
    once = apply_measured(plan, graph, costs, {EDGE_ONLY: (4.3, 0.0)})
    twice = apply_measured(once, graph, costs, {"c002": (2.5, 1.0)})
    assert set(twice.measured) == {EDGE_ONLY, "c002"}
    kept = twice.candidate(EDGE_ONLY)
    assert kept.edge_ms == 4.3 and kept.predicted_edge_ms == pytest.approx(4.0)
    again = apply_measured(twice, graph, costs, {EDGE_ONLY: (3.9, 0.0)})  # a new timing replaces the old one
    replaced = again.candidate(EDGE_ONLY)
    assert replaced.edge_ms == 3.9 and replaced.predicted_edge_ms == pytest.approx(4.0)
    with pytest.raises(KeyError, match="c999"):
        apply_measured(plan, graph, costs, {"c999": (1.0, 1.0)})


def test_timed_compute_is_checked_against_the_budgets_again():
    graph, costs, _, plan = near_tie(Budgets(max_latency_ms=4.2))
    assert plan.chosen == EDGE_ONLY and plan.best.feasible
    refined = apply_measured(plan, graph, costs, {EDGE_ONLY: (4.3, 0.0)})
    slow = refined.candidate(EDGE_ONLY)
    assert not slow.feasible and "latency 4.3 ms > budget 4.2 ms" in slow.violations[0]
    assert refined.feasible and refined.chosen == CLOUD_ONLY  # the next best by prediction, still feasible
    # and the other way: a cut infeasible by prediction becomes feasible when timed faster
    tight = apply_measured(near_tie(Budgets(max_latency_ms=3.5))[3], graph, costs, {CLOUD_ONLY: (0.0, 2.0)})
    assert tight.feasible and tight.chosen == CLOUD_ONLY and tight.best.violations == ()


def test_plan_table_is_rebuilt_with_the_timed_compute():
    graph, costs, _, plan = near_tie()
    assert dict(plan.plan_table) == {0.001: EDGE_ONLY, 1000.0: EDGE_ONLY}
    refined = apply_measured(plan, graph, costs, {CLOUD_ONLY: (0.0, 2.9)})
    assert dict(refined.plan_table) == {0.001: EDGE_ONLY, 1000.0: CLOUD_ONLY}


# A residual block as onnxruntime fuses it: conv (the only kernel) with add and relu fused in (cost 0 in the
# full run); `skip` is the block input, 4-D tensors of 1x8x16x16 floats (8,192 bytes each).
RESIDUAL = {"stem": ["x"], "conv": ["stem"], "add": ["conv", "stem"], "relu": ["add"], "flat": ["relu"],
            "fc": ["flat"]}
RESIDUAL_OPS = {"stem": "Conv", "conv": "Conv", "add": "Add", "relu": "Relu", "flat": "Flatten", "fc": "Gemm"}


def residual_graph() -> CutGraph:
    graph = make_graph(RESIDUAL, dict.fromkeys([*RESIDUAL, "x"], 1), ["fc"])
    shapes = {t: (1, 8, 16, 16) for t in ("x", "stem", "conv", "add", "relu")} | {"flat": (1, 2048), "fc": (1, 10)}
    tensors = {t: TensorInfo(t, info.producer, info.consumers, shapes[t], "float32")
               for t, info in graph.tensors.items()}
    return CutGraph(graph.nodes, graph.node_inputs, graph.node_weight_bytes, tensors, graph.inputs, graph.outputs,
                    RESIDUAL_OPS)


def test_a_cut_pays_layout_reorders_and_the_fusions_it_breaks():
    graph = residual_graph()
    cost = {"stem": 1.0, "conv": 2.0, "add": 0.0, "relu": 0.0, "flat": 0.0, "fc": 0.5}
    rates = BoundaryRates(launch_ms=0.01, gbps=8.192)  # 8,192 bytes -> 0.001 ms
    link = Link(uplink_mbps=1000, downlink_mbps=1000, rtt_ms=1.0)
    plain = CostInputs(edge_ms=cost, cloud_ms=cost)
    cut = CostInputs(edge_ms=cost, cloud_ms=cost, edge_boundary=rates,
                     cloud_boundary=BoundaryRates(0.01, 8.192, reorders=True))
    after_stem = frozenset({"stem"})
    base = evaluate_cut(graph, after_stem, plain, link, Budgets(), "c")
    paid = evaluate_cut(graph, after_stem, cut, link, Budgets(), "c")
    assert paid.edge_ms == pytest.approx(base.edge_ms)  # the edge runtime keeps one layout: nothing to convert
    # cloud: one reorder of `stem` (0.011 ms); add and relu run alone (0.011 ms each); conv and the view op do not
    assert paid.cloud_ms == pytest.approx(base.cloud_ms + 3 * 0.011)
    # a cut after the block breaks nothing: the flattened tensor is 2-D (no reorder), fc is a kernel anyway
    late = frozenset({"stem", "conv", "add", "relu", "flat"})
    assert evaluate_cut(graph, late, cut, link, Budgets(), "c").cloud_ms == pytest.approx(
        evaluate_cut(graph, late, plain, link, Budgets(), "c").cloud_ms)
    # the edge pays the reorder back when its runtime reorders; the baselines never pay either
    both = CostInputs(edge_ms=cost, cloud_ms=cost, edge_boundary=BoundaryRates(0.01, 8.192, reorders=True),
                      cloud_boundary=BoundaryRates(0.01, 8.192, reorders=True))
    assert evaluate_cut(graph, after_stem, both, link, Budgets(), "c").edge_ms == pytest.approx(base.edge_ms + 0.011)
    for nodes in (frozenset(), frozenset(RESIDUAL)):
        assert evaluate_cut(graph, nodes, both, link, Budgets(), "b").total_ms == pytest.approx(
            evaluate_cut(graph, nodes, plain, link, Budgets(), "b").total_ms)


def test_a_reorder_the_head_does_is_not_charged_to_the_cloud_again():
    # relu ran on the blocked layout in the full run, and the reorder back (0.2 of its 0.3 ms) was charged to it.
    # Cut at add's output, the head converts `add` (B_edge) and relu runs plain in the cloud: no reorder there.
    graph = residual_graph()
    cost = {"stem": 1.0, "conv": 2.0, "add": 0.0, "relu": 0.3, "flat": 0.0, "fc": 0.5}
    link = Link(uplink_mbps=1000, downlink_mbps=1000, rtt_ms=1.0)
    reorders = BoundaryRates(0.01, 8.192, reorders=True)
    charged = CostInputs(edge_ms=cost, cloud_ms=cost, cloud_boundary=reorders)
    moved = replace(charged, cloud_reorder_out_ms={"relu": 0.2, "conv": 0.4})
    before_relu = frozenset({"stem", "conv", "add"})
    assert evaluate_cut(graph, before_relu, moved, link, Budgets(), "c").cloud_ms == pytest.approx(
        evaluate_cut(graph, before_relu, charged, link, Budgets(), "c").cloud_ms - 0.2)
    # a Conv fed a cut tensor still runs blocked in the cloud and converts back itself: its reorder stays
    after_stem = frozenset({"stem"})
    assert evaluate_cut(graph, after_stem, moved, link, Budgets(), "c").cloud_ms == pytest.approx(
        evaluate_cut(graph, after_stem, charged, link, Budgets(), "c").cloud_ms)
    # a cloud runtime that keeps one layout never had the reorder; the credit never exceeds the node's cost
    plain = replace(moved, cloud_boundary=BoundaryRates(0.01, 8.192))
    assert evaluate_cut(graph, before_relu, plain, link, Budgets(), "c").cloud_ms == pytest.approx(
        evaluate_cut(graph, before_relu, CostInputs(edge_ms=cost, cloud_ms=cost, cloud_boundary=plain.cloud_boundary),
                     link, Budgets(), "c").cloud_ms)
    capped = replace(charged, cloud_reorder_out_ms={"relu": 5.0})
    assert evaluate_cut(graph, before_relu, capped, link, Budgets(), "c").cloud_ms == pytest.approx(
        evaluate_cut(graph, before_relu, charged, link, Budgets(), "c").cloud_ms - 0.3)


@pytest.mark.parametrize("seed", range(8))
def test_planner_with_layout_reorders_equals_brute_force_on_random_dags(seed):
    # Reorders are paid per crossing tensor, as transfer is, so the min-cut search stays exact: the choice must
    # equal the brute-force optimum of the full formula. Where the reorder term is what decides, a search that
    # left it out of its tensor weights would stop at a cut that sends many big 4-D tensors.
    rng = random.Random(100 + seed)
    names = [f"v{i}" for i in range(rng.randint(5, 9))]
    edges = {v: (["x"] if i == 0 else rng.sample(names[:i], min(i, rng.randint(1, 2)))) for i, v in enumerate(names)}
    consumed = {t for ins in edges.values() for t in ins}
    sizes = {"x": 400_000, **{v: rng.choice([4_000, 80_000, 400_000]) for v in names}}
    base = make_graph(edges, sizes, [v for v in names if v not in consumed])
    tensors = {t: TensorInfo(t, i.producer, i.consumers, (1, 1, 1, sizes[t] // 4), "float32")
               for t, i in base.tensors.items()}
    graph = CutGraph(base.nodes, base.node_inputs, base.node_weight_bytes, tensors, base.inputs, base.outputs,
                     dict.fromkeys(names, "Conv"))
    costs = CostInputs(edge_ms={v: rng.uniform(0.5, 10) for v in names},
                       cloud_ms={v: rng.uniform(0.05, 2) for v in names},
                       edge_boundary=BoundaryRates(0.05, 0.5, reorders=True),
                       cloud_boundary=BoundaryRates(0.02, 0.8, reorders=True))
    link = Link(uplink_mbps=rng.choice([100.0, 1000.0, 10_000.0]), downlink_mbps=1000, rtt_ms=2)
    plan = plan_cuts(graph, costs, link)
    value, _ = brute_force(graph, costs, link, Budgets())
    assert plan.best.total_ms == pytest.approx(value, rel=1e-9)


def test_boundary_rates_are_checked():
    with pytest.raises(ValueError, match="gbps > 0"):
        BoundaryRates(launch_ms=0.01, gbps=0)
