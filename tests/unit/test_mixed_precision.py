"""Mixed precision: a head that fails its int8 gate keeps its most sensitive nodes in float until it passes.

The model is the zoo's trained classifier (shapes_mobilenet, trained on procedural images: agreement figures
mean something). Its sensitive variant (models.train.with_outlier_channel) has a 1x1 conv pair after the stem
that scales one channel up by 1e3 and back (the same function in fp32): the per-tensor uint8 range of the
tensor between them is then set by that channel alone, so int8 zeroes the other 15, as an outlier channel does.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from models.convert import to_onnx  # noqa: E402
from models.manifest import BundleError  # noqa: E402
from models.plandoc import CutVerification  # noqa: E402
from models.tiny_bundle import make_tiny_bundle  # noqa: E402
from models.train import accuracy, shapes_dataset, trained_model, with_outlier_channel  # noqa: E402
from partitioning.extract import session  # noqa: E402
from partitioning.quantize import (  # noqa: E402
    QuantConfig,
    int8_agreement,
    node_sensitivity,
    quantize_gated,
    quantize_head,
)


@pytest.fixture(scope="session")
def trained():
    """The trained classifier (trained once per cache, ~30 s; then loaded)."""
    return trained_model("shapes_mobilenet", quiet=True)


@pytest.fixture(scope="session")
def onnx_models(trained, tmp_path_factory):
    """{"plain": the trained classifier, "sensitive": it with the outlier pair} as ONNX files."""
    root = tmp_path_factory.mktemp("mixed")
    x = torch.from_numpy(shapes_dataset(1, seed=9)[0])
    # traced: the legacy exporter takes seconds here where the dynamo one takes a minute
    return {"plain": to_onnx(torch.jit.trace(trained, x), (x,), root / "plain.onnx"),
            "sensitive": to_onnx(torch.jit.trace(with_outlier_channel(trained), x), (x,), root / "sensitive.onnx")}


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    x = shapes_dataset(count, seed)[0]
    return [{"input": x[i : i + 1]} for i in range(count)]


CALIB, CHECKS = _samples(16, seed=2), _samples(64, seed=3)  # held out: training used seed 0


def _gate(fp32_path):
    reference = [session(fp32_path).run(None, x) for x in CHECKS]

    def gate(path):
        q = session(path)
        return int8_agreement(reference, [q.run(None, x) for x in CHECKS], "classification")

    return gate


def test_the_trained_classifier_is_accurate_on_held_out_images(trained) -> None:
    assert accuracy(trained, count=300, seed=1) >= 0.9


def test_the_trained_classifier_passes_its_int8_gate_as_plain_int8(onnx_models, tmp_path) -> None:
    path, out = onnx_models["plain"], tmp_path / "q.onnx"
    result = quantize_gated(path, out, CALIB, _gate(path))
    assert result.precision == "int8" and result.float_nodes == ()
    assert result.calibration == "minmax"  # auto tries minmax first
    assert result.gate["metric"] == "top1_agreement" and result.gate["value"] >= 0.9
    # agreement means something here: int8 is about as accurate as fp32 on held-out labelled images
    x, y = shapes_dataset(200, seed=5)
    fp32, int8 = session(path), session(out)
    accuracy_of = {name: float(np.mean(s.run(None, {"input": x})[0].argmax(1) == y)) for name, s in
                   (("fp32", fp32), ("int8", int8))}
    assert accuracy_of["fp32"] >= 0.9 and accuracy_of["int8"] >= accuracy_of["fp32"] - 0.03, accuracy_of


def test_the_sensitive_head_fails_plain_minmax_int8(onnx_models, tmp_path) -> None:
    """What split-profile did before mixed precision: one MinMax int8 head, and the gate failed."""
    path = onnx_models["sensitive"]
    quantize_head(path, tmp_path / "q.onnx", CALIB, QuantConfig(), "minmax")
    verdict = _gate(path)(tmp_path / "q.onnx")
    assert not verdict["passed"] and verdict["value"] < 0.8


def test_node_sensitivity_ranks_the_outlier_consumer_first(onnx_models) -> None:
    path = onnx_models["sensitive"]
    ranked = node_sensitivity(path, CALIB, QuantConfig(), "minmax")
    assert ranked[0][0] == _down_conv(path), ranked[:3]
    assert ranked[0][1] > 3 * max(abs(s) for _, s in ranked[1:])


def _convs(path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


def _up_conv(path) -> str:
    """The conv that makes the outlier tensor (the first of the pair, after the stem)."""
    return _convs(path)[1]


def _down_conv(path) -> str:
    """The conv that reads the outlier tensor (the second of the pair)."""
    return _convs(path)[2]


def test_mixed_precision_passes_the_gate_with_the_sensitive_node_in_float(onnx_models, tmp_path) -> None:
    path, out = onnx_models["sensitive"], tmp_path / "q.onnx"
    result = quantize_gated(path, out, CALIB, _gate(path), QuantConfig(calibration="minmax"))
    assert result.precision == "mixed" and result.gate["passed"]
    assert result.gate["value"] >= 0.9
    # the consumer of the outlier tensor and its producer (whose output int8 would quantize too), nothing more
    assert set(result.float_nodes) == {_down_conv(path), _up_conv(path)}
    assert [a["passed"] for a in result.attempts][0] is False and result.attempts[-1]["passed"]
    # the file written is that mixed head: the float node reads no dequantized tensor, the others still do
    q = onnx.load(str(out))
    made_by = {o: n.op_type for n in q.graph.node for o in n.output}
    ops = {n.name: [made_by.get(i) for i in n.input] for n in q.graph.node}
    assert "DequantizeLinear" not in ops[_down_conv(path)]
    assert sum("DequantizeLinear" in v for v in ops.values()) > 10
    record = result.record()
    assert record["precision"] == "mixed" and record["float_nodes"] == list(result.float_nodes)
    assert record["calibration"] == "minmax" and record["passed"]


def test_without_mixed_a_failing_head_is_fp32(onnx_models, tmp_path) -> None:
    path = onnx_models["sensitive"]
    result = quantize_gated(path, tmp_path / "q.onnx", CALIB, _gate(path),
                            QuantConfig(calibration="minmax", mixed=False))
    assert result.precision == "fp32" and not result.gate["passed"]


def test_quant_config_refuses_an_unknown_calibration_method() -> None:
    with pytest.raises(ValueError, match="calibration must be one of"):
        QuantConfig(calibration="kl")
    assert QuantConfig(calibration="auto").methods == ("minmax", "entropy", "percentile")
    assert QuantConfig(calibration="entropy").methods == ("entropy",)


# -- plan.json records --------------------------------------------------------------------------------------


def test_cut_verification_reads_the_precision_fields_and_old_plans() -> None:
    new = CutVerification.from_json({"split": {"passed": True}, "int8": {
        "metric": "top1_agreement", "value": 0.95, "threshold": 0.9, "passed": True, "samples": 32,
        "precision": "mixed", "calibration": "entropy", "float_nodes": ["conv_3", "conv_7"], "attempts": []}}, "v")
    assert new.precision == "mixed" and new.float_nodes == ("conv_3", "conv_7")
    old_pass = CutVerification.from_json({"split": {}, "int8": {"metric": "top1_agreement", "passed": True}}, "v")
    old_fail = CutVerification.from_json({"split": {}, "int8": {"metric": "top1_agreement", "passed": False}}, "v")
    assert (old_pass.precision, old_fail.precision, old_fail.float_nodes) == ("int8", "fp32", ())
    assert CutVerification.from_json({"split": {}}, "v").precision is None


@pytest.mark.parametrize("bad, message", [
    ({"precision": "int4"}, "precision: expected one of"),
    ({"calibration": "kl"}, "calibration: expected one of"),
    ({"float_nodes": "conv_3"}, "float_nodes: expected a list"),
])
def test_bad_precision_fields_are_refused_by_name(bad, message) -> None:
    with pytest.raises(BundleError, match=message):
        CutVerification.from_json({"split": {}, "int8": {"passed": True, **bad}}, "verification.cuts.c1")


def test_a_bundle_written_before_mixed_precision_still_loads_and_runs_int8(tmp_path) -> None:
    from models.manifest import Bundle

    root = make_tiny_bundle(tmp_path / "b")  # its plan.json has no precision fields
    bundle = Bundle.load(root)
    gates = {cid: v["int8"] for cid, v in bundle.plan["verification"]["cuts"].items() if v.get("int8")}
    checks = [CutVerification.from_json({"split": {}, "int8": g}, cid) for cid, g in gates.items()]
    assert checks and all(v.precision == "int8" and v.float_nodes == () for v in checks)
    cut = bundle.cut(bundle.chosen)
    assert cut.edge_head == cut.head_int8


# -- the choice made again at the precision each head runs ---------------------------------------------------


def test_the_cut_is_chosen_again_with_each_head_costed_at_the_precision_it_runs(onnx_models, tmp_path) -> None:
    """Cheap int8 edge, slow fp32 edge: at int8 the whole model runs on the device (edge-only); its int8 head fails
    the gate and runs mixed, its outlier pair in float at the fp32 time, so a cut that leaves the pair to the
    cloud is better. The bundle's choice and plan table are made again with that cost, and the cuts they move to
    are exported and gated (before, the choice made at int8 stayed)."""
    from models.manifest import CLOUD_ONLY, EDGE_ONLY
    from partitioning import profile
    from partitioning.bundle import HeadCosting, write_bundle
    from partitioning.graph import build_cut_graph
    from partitioning.planner import CostInputs, plan_cuts

    path = onnx_models["sensitive"]
    result = profile(path, device="rpi4", cloud="t4", network="4g")  # the document's records; the plan is ours
    proto = onnx.load(str(path))
    graph = build_cut_graph(proto)
    costs = CostInputs(edge_ms={v: 0.01 for v in graph.nodes}, cloud_ms={v: 2.0 for v in graph.nodes})
    plan = plan_cuts(graph, costs, result.plan.link, result.plan.budgets, (1.0, 100.0))
    assert plan.chosen == EDGE_ONLY and {cid for _, cid in plan.plan_table} == {EDGE_ONLY}
    fp32 = {v: 500.0 for v in graph.nodes}
    doc = write_bundle(tmp_path / "b", proto, path, graph, plan, result.plan_document, CALIB, CHECKS,
                       "classification", QuantConfig(calibration="minmax"), costing=HeadCosting(costs, fp32))
    assert doc.verification is not None and doc.artifacts is not None
    checks = doc.verification.cuts
    assert checks[EDGE_ONLY].precision == "mixed" and checks[EDGE_ONLY].float_nodes
    records = {c.id: c for c in doc.candidates}
    assert records[EDGE_ONLY].edge_ms >= 500.0  # costed at the precision it runs
    assert doc.chosen not in (EDGE_ONLY, CLOUD_ONLY), doc.chosen
    exported = set(doc.artifacts.cuts)
    assert doc.chosen in exported and {row.cut for row in doc.plan_table} <= exported
    # the choice is the best of the candidates as they are costed now, and its head was gated
    assert records[doc.chosen].total_ms == min(c.total_ms for c in doc.candidates)
    assert checks[doc.chosen].int8 is not None and checks[doc.chosen].int8["passed"]


# -- fewer tries: the gate stops early, later heads start from the float nodes an earlier one needed ----------


def test_a_top1_gate_stops_once_it_cannot_pass_and_a_passing_one_runs_every_sample() -> None:
    from partitioning.quantize import gated_agreement

    reference = [[np.eye(4, dtype=np.float32)[[i % 4]]] for i in range(20)]  # 20 samples, classes 0..3
    ran: list[int] = []

    def run_wrong_first(i: int) -> list[np.ndarray]:
        ran.append(i)
        return [np.roll(reference[i][0], 1, axis=1) if i < 3 else reference[i][0]]  # the first 3 disagree

    verdict = gated_agreement(reference, run_wrong_first, "classification")
    # after 3 wrong of 20 the best reachable is 17/20 = 0.85 < 0.9: it stopped there
    assert ran == [0, 1, 2] and not verdict["passed"]
    assert (verdict["stopped_after"], verdict["of"], verdict["samples"], verdict["value"]) == (3, 20, 3, 0.0)
    ran.clear()
    verdict = gated_agreement(reference, lambda i: (ran.append(i), [reference[i][0]])[1], "classification")
    assert ran == list(range(20)) and verdict["passed"] and "stopped_after" not in verdict
    # a relative-error gate cannot know early: it runs every sample
    ran.clear()
    verdict = gated_agreement(reference, lambda i: (ran.append(i), [reference[i][0] * 3])[1], "segmentation")
    assert ran == list(range(20)) and verdict["metric"] == "relative_error" and not verdict["passed"]


def test_a_head_seeded_with_another_heads_float_nodes_passes_in_one_try(onnx_models, tmp_path) -> None:
    path = onnx_models["sensitive"]
    searched = quantize_gated(path, tmp_path / "a.onnx", CALIB, _gate(path), QuantConfig(calibration="minmax"))
    assert searched.precision == "mixed" and len(searched.attempts) > 1
    seed = ("minmax", (*searched.float_nodes, "a_node_this_head_lacks"))
    seeded = quantize_gated(path, tmp_path / "b.onnx", CALIB, _gate(path), QuantConfig(calibration="minmax"),
                            seed=seed)
    assert seeded.precision == "mixed" and seeded.gate["passed"]
    assert seeded.float_nodes == searched.float_nodes  # the nodes it has, in order
    # plain int8 at the seed's method first (it fails here), then the seed's nodes in float: two tries, no search
    assert [(a.get("seeded"), a["float_nodes"], a["passed"]) for a in seeded.attempts] == [
        (True, 0, False), (True, len(searched.float_nodes), True)]
    # a seed with none of the head's nodes changes nothing: the usual search
    other = quantize_gated(path, tmp_path / "c.onnx", CALIB, _gate(path), QuantConfig(calibration="minmax"),
                           seed=("minmax", ("elsewhere",)))
    assert [a["float_nodes"] for a in other.attempts] == [a["float_nodes"] for a in searched.attempts]


def test_a_head_that_passes_only_with_every_node_in_float_is_labelled_fp32(onnx_models, tmp_path) -> None:
    """Mixed precision with every quantized node kept in float leaves no QuantizeLinear: that head is the fp32
    head, and plan.json, the bundle and the agent say so (it was recorded as "mixed" with an int8 label)."""
    import json

    from edge_agent.runtime import head_choice
    from models.manifest import Bundle
    from partitioning.bundle import fallback_line
    from partitioning.quantize import HeadQuantization, _finished, _quantized_nodes

    path = onnx_models["sensitive"]
    quantize_head(path, tmp_path / "q.onnx", CALIB, QuantConfig(), "minmax")
    every = tuple(_quantized_nodes(onnx.load(str(tmp_path / "q.onnx"))))
    quantize_head(path, tmp_path / "all.onnx", CALIB, QuantConfig(), "minmax", every)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in onnx.load(str(tmp_path / "all.onnx"))
                                                         .graph.node}
    verdict = _gate(path)(tmp_path / "all.onnx")
    tries = ({"calibration": "minmax", "float_nodes": 0, "value": 0.5, "passed": False},
             {"calibration": "minmax", "float_nodes": len(every), "value": verdict["value"], "passed": True})
    result = _finished(tmp_path / "all.onnx", HeadQuantization("mixed", "minmax", every, verdict, tries))
    assert verdict["passed"] and result.precision == "fp32"
    partial = _finished(tmp_path / "q.onnx", HeadQuantization("mixed", "minmax", every[:1], verdict, tries))
    assert partial.precision == "mixed"  # something is still quantized there
    # a bundle whose chosen head is recorded so runs (and is labelled) fp32
    root = make_tiny_bundle(tmp_path / "b")
    plan = Bundle.load(root).plan
    cut = plan["chosen"]
    plan["verification"]["cuts"][cut]["int8"].update(result.record())
    (root / "plan.json").write_text(json.dumps(plan))
    loaded = Bundle.load(root).cut(cut)
    assert not loaded.int8_passed and loaded.edge_head == loaded.head
    assert head_choice(plan, cut, "int8", False).startswith("fp32 head (its gate passed only with every")
    line = fallback_line(cut, CutVerification.from_json({"split": {}, "int8": result.record()}, "v"))
    assert line is not None and "passed only with every quantized node kept in float" in line


def test_each_fallback_case_has_its_own_warning() -> None:
    from partitioning.bundle import fallback_line

    def check(precision, attempts, passed=True, floats=("a", "b")):
        return CutVerification.from_json({"split": {}, "int8": {
            "metric": "top1_agreement", "value": 0.95 if passed else 0.5, "threshold": 0.9, "passed": passed,
            "samples": 32, "precision": precision, "calibration": "minmax", "float_nodes": list(floats),
            "attempts": attempts}}, "v")

    plain_fail = {"calibration": "minmax", "float_nodes": 0, "value": 0.25, "passed": False, "stopped_after": 6}
    assert fallback_line("c1", check("int8", [], floats=())) is None
    mixed = fallback_line("c1", check("mixed", [plain_fail]))
    assert mixed is not None and "failed the gate (top1_agreement 0.250 on the samples run" in mixed
    assert "mixed precision with 2 node(s)" in mixed
    seeded = fallback_line("c1", check("mixed", [{"calibration": "minmax", "float_nodes": 2, "value": 0.95,
                                                  "passed": True, "seeded": True}]))
    assert seeded is not None and "plain int8 head was not tried" in seeded
    tried = [plain_fail, {"calibration": "entropy", "float_nodes": 0, "error": "range not finite", "passed": False},
             {"calibration": "minmax", "float_nodes": 1, "value": 0.5, "passed": False}]
    failed = fallback_line("c1", check("fp32", tried, passed=False))
    assert failed is not None and "even with 1 of its 2 quantized node(s) kept in float; it runs the fp32" in failed
    assert "calibration tried: minmax; entropy could not calibrate" in failed
