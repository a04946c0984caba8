"""The accuracy gate of lossy codecs on a real ONNX model; codec rates in a saved device profile."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from models.manifest import CLOUD_ONLY
from partitioning.codecs import CodecGate, gate_plan
from partitioning.costtypes import CodecRate, NodeCosts
from partitioning.device_profile import load_device_profile, save_device_profile
from partitioning.graph import build_cut_graph
from partitioning.planner import CodecCosts, CostInputs, Link, plan_cuts
from partitioning.quantize import gated_agreement


def outlier_model() -> onnx.ModelProto:
    """logits = flatten(x) @ W, where W ignores element 0 of each channel: the class rests on the small values,
    while element 0 is a huge outlier that sets an int8 scale (per tensor and per channel) too coarse for them."""
    w = np.random.default_rng(0).normal(size=(8, 10)).astype(np.float32)
    w[[0, 4]] = 0.0
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "w"], ["logits"], name="matmul")]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def samples(n: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        x = rng.normal(size=(1, 2, 4)).astype(np.float32)
        x[0, :, 0] = 1000.0
        out.append({"x": x})
    return out


def test_lossy_codecs_that_change_the_answer_are_dropped_and_the_plan_chosen_again():
    model = outlier_model()
    graph = build_cut_graph(model)
    rates = {s: CodecRate(0.0, 0.0) for s in ("fp32", "fp16", "int8", "int8+zstd", "int8c")}
    costs = CostInputs(edge_ms={v: 100.0 for v in graph.nodes}, cloud_ms={v: 0.1 for v in graph.nodes},
                       codecs=CodecCosts(rates, rates, {"int8+zstd": {"x": 0.2}}))
    plan = plan_cuts(graph, costs, Link(1.0, 10.0, 1.0))
    assert (plan.chosen, plan.best.codec) == (CLOUD_ONLY, "int8+zstd")  # the cheapest on the wire, unchecked
    gate = CodecGate(model, samples(), "classification", gated_agreement)
    try:
        assert gate.check(CLOUD_ONLY, ("x",), "int8")["passed"] is False
        assert gate.check(CLOUD_ONLY, ("x",), "fp16")["passed"] is True
        gated, gated_costs = gate_plan(plan, graph, costs, gate)
    finally:
        gate.close()
    cloud = gated.candidate(CLOUD_ONLY)
    assert gated.chosen == CLOUD_ONLY and cloud.codec == "fp16"
    # only the codecs the plan was about to send are checked: int8 (with its compressions) failed; the next
    # choice, fp16, passed; int8c was never the choice here, so it was never run
    assert set(cloud.codecs_rejected) == {"int8", "int8+zstd"}
    assert "top1_agreement" in cloud.codecs_rejected["int8"]
    assert set(gated_costs.codecs.denied[CLOUD_ONLY]) == {"int8", "int8+zstd"}  # type: ignore[union-attr]


def test_a_device_profile_keeps_the_codecs_timed_on_the_device(tmp_path):
    costs = NodeCosts({"n": 1.0}, 0.1, "measured", "here")
    codecs = {"int8+zstd": {"encode": [0.01, 2.5], "decode": [0.02, 1.0]}}
    save_device_profile(tmp_path / "p.json", costs, model_sha256="0" * 64, host={}, codecs=codecs)
    assert load_device_profile(tmp_path / "p.json").codec_encode == {"int8+zstd": CodecRate(0.01, 2.5)}
    save_device_profile(tmp_path / "old.json", costs, model_sha256="0" * 64, host={})
    assert load_device_profile(tmp_path / "old.json").codec_encode is None
