"""The codec is chosen with the cut: costing per codec, the choice flipping with bandwidth, plan.json records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import wirecodec as wc
from models.manifest import Bundle, BundleError, CandidateRecord, PlanRow
from partitioning.codecs import measure_codecs
from partitioning.costtypes import CodecRate
from partitioning.graph import CutGraph, TensorInfo
from partitioning.planner import (
    CLOUD_ONLY,
    EDGE_ONLY,
    TENSOR_OVERHEAD_BYTES,
    Budgets,
    CodecCosts,
    CostInputs,
    Link,
    apply_measured,
    evaluate_cut,
    plan_cuts,
    wire_bytes,
)
from protos import codec as pc

X_SHAPE = (1, 8, 50, 50)  # 20 000 floats: 80 kB raw, 20 kB as int8


def chain() -> CutGraph:
    """x -> n1 -> n2 (output): a 4-D input, a 4-D activation, a small output."""
    shapes = {"x": X_SHAPE, "n1": (1, 8, 50, 50), "n2": (1, 10)}
    consumers = {"x": ("n1",), "n1": ("n2",), "n2": ()}
    producer = {"x": None, "n1": "n1", "n2": "n2"}
    tensors = {t: TensorInfo(t, producer[t], consumers[t], shapes[t], "float32") for t in shapes}
    return CutGraph(nodes=("n1", "n2"), node_inputs={"n1": ("x",), "n2": ("n1",)},
                    node_weight_bytes={"n1": 1000, "n2": 1000}, tensors=tensors, inputs=("x",), outputs=("n2",))


# Per MB of fp32 tensor: fp32 is free to encode, int8 cheap, zstd costs; zstd shrinks these tensors to 10 %.
RATES = {"fp32": CodecRate(0.0, 0.0), "int8": CodecRate(0.02, 1.0), "int8+zstd": CodecRate(0.5, 10.0)}


def codec_costs(**kw) -> CodecCosts:
    return CodecCosts(RATES, RATES, {"int8+zstd": {"x": 0.1, "n1": 0.1}}, **kw)


def costs(**kw) -> CostInputs:
    # The edge is 100x slower than the cloud: sending everything (cloud-only) is best once the link allows it.
    return CostInputs(edge_ms={"n1": 50.0, "n2": 50.0}, cloud_ms={"n1": 0.5, "n2": 0.5}, codecs=codec_costs(**kw))


def test_compressed_codec_wins_on_a_slow_link_and_a_cheap_one_on_a_fast_link():
    graph = chain()
    slow = plan_cuts(graph, costs(), Link(1.0, 10.0, 1.0))
    fast = plan_cuts(graph, costs(), Link(1000.0, 1000.0, 1.0))
    assert (slow.chosen, slow.best.codec) == (CLOUD_ONLY, "int8+zstd")  # cloud-only with the input compressed
    assert (fast.chosen, fast.best.codec) == (CLOUD_ONLY, "int8")
    # the plan table chooses again at each rate: the codec flips with the uplink
    rows = dict(zip((m for m, _ in slow.plan_table), slow.table_codecs))
    assert rows[0.5] == "int8+zstd" and rows[1000.0] == "int8"


def test_the_chosen_codecs_costs_are_in_the_candidate_and_its_total():
    graph = chain()
    link = Link(1.0, 10.0, 1.0)
    cand = plan_cuts(graph, costs(), link).best
    enc = RATES["int8+zstd"].ms(graph.tensors["x"].nbytes)
    assert cand.encode_ms == pytest.approx(enc) and cand.decode_ms == pytest.approx(enc)
    assert cand.total_ms == pytest.approx(cand.edge_ms + cand.encode_ms + cand.transfer_ms + cand.decode_ms
                                          + cand.cloud_ms)
    payload = int(np.ceil(20_000 * 0.1))
    assert cand.transfer_bytes == 64 + TENSOR_OVERHEAD_BYTES + payload
    options = {o.codec: total for o, _, total in cand.codec_options}
    assert set(options) == set(RATES) and min(options, key=options.get) == "int8+zstd"
    record = cand.record()
    assert record.codec == "int8+zstd" and set(record.codecs or {}) == set(RATES)
    assert record.codecs["fp32"]["transfer_bytes"] == 64 + TENSOR_OVERHEAD_BYTES + 80_000  # cloud-only raw


def test_edge_only_sends_nothing_and_has_no_codec():
    graph = chain()
    cand = evaluate_cut(graph, frozenset(graph.nodes), costs(), Link(1.0, 1.0, 1.0), Budgets(), EDGE_ONLY)
    assert cand.codec is None and cand.encode_ms == 0 and cand.transfer_bytes == 0


def test_a_codec_the_gate_rejected_is_not_used_for_that_cut():
    graph = chain()
    why = "int8 on this cut: top1_agreement 0.5 vs threshold 0.99"
    gated = costs(denied={CLOUD_ONLY: {"int8": why, "int8+zstd": why}})
    plan = plan_cuts(graph, gated, Link(1.0, 10.0, 1.0))
    cloud = plan.candidate(CLOUD_ONLY)
    assert cloud.codec == "fp32" and dict(cloud.codecs_rejected) == {"int8": why, "int8+zstd": why}
    assert cloud.record().codecs_rejected == {"int8": why, "int8+zstd": why}
    assert plan.candidate("c001").codec == "int8+zstd"  # the other cut keeps it


def test_rejections_applied_to_an_existing_plan_choose_again():
    graph = chain()
    link = Link(1.0, 10.0, 1.0)
    plan = plan_cuts(graph, costs(), link)
    again = apply_measured(plan, graph, costs(denied={CLOUD_ONLY: {"int8+zstd": "x"}}), {})
    assert again.candidate(CLOUD_ONLY).codec != "int8+zstd"


def test_int8c_is_offered_only_where_every_float_cut_tensor_has_channels():
    rates = {"fp32": CodecRate(0, 0), "int8c": CodecRate(0, 0.1)}
    graph = chain()
    flat = CutGraph(graph.nodes, graph.node_inputs, graph.node_weight_bytes,
                    {**graph.tensors, "x": TensorInfo("x", None, ("n1",), (20_000,), "float32")},
                    graph.inputs, graph.outputs)
    c = CostInputs(edge_ms={"n1": 5.0, "n2": 5.0}, cloud_ms={"n1": 0.5, "n2": 0.5},
                   codecs=CodecCosts(rates, rates))
    link = Link(1.0, 1.0, 1.0)
    assert evaluate_cut(graph, frozenset(), c, link, Budgets(), CLOUD_ONLY).codec == "int8c"
    assert evaluate_cut(flat, frozenset(), c, link, Budgets(), CLOUD_ONLY).codec == "fp32"


def test_without_codec_costs_every_cut_uses_the_one_codec_at_no_cost():
    graph = chain()
    plain = CostInputs(edge_ms={"n1": 50.0, "n2": 50.0}, cloud_ms={"n1": 0.5, "n2": 0.5}, codec="fp16")
    plan = plan_cuts(graph, plain, Link(1.0, 10.0, 1.0))
    assert {c.codec for c in plan.candidates if c.id != EDGE_ONLY} == {"fp16"}
    assert all(c.encode_ms == 0 and c.decode_ms == 0 for c in plan.candidates)
    assert plan.best.record().codecs is None


@pytest.mark.parametrize("spec", ["fp32", "fp16", "int8", "int8c", "int8+lz4", "int8c+zstd", "fp16+zstd"])
def test_the_costed_bytes_and_values_are_what_the_wire_carries(spec):
    x = np.maximum(np.random.default_rng(0).normal(size=X_SHAPE), 0).astype(np.float32)  # post-ReLU-like
    tensor = pc.encode("x", x, spec)
    values, costed = wc.round_trip(x, spec)
    scales = 8 * len(tensor.quantization.scale) if tensor.quantization.axis > 0 else 0  # per channel only
    assert costed == len(tensor.data) + scales
    np.testing.assert_array_equal(values, pc.decode(tensor))
    if "+" not in spec:  # a fixed-size codec: the planner's bytes are exact
        assert wire_bytes(chain(), "x", spec) == TENSOR_OVERHEAD_BYTES + len(tensor.data) + scales


def test_measured_codecs_fit_rates_and_compression_on_the_tensors():
    rng = np.random.default_rng(1)
    arrays = {f"t{i}": np.maximum(rng.normal(size=(1, 4, 8 * (i + 1), 32)), 0).astype(np.float32) for i in range(4)}
    arrays["flat"] = rng.normal(size=(300,)).astype(np.float32)
    profile = measure_codecs(arrays, ("fp32", "int8", "int8+zstd", "int8c"))
    assert set(profile.encode) == set(profile.decode) == {"fp32", "int8", "int8+zstd", "int8c"}
    assert all(r.fixed_ms >= 0 and r.ms_per_mb >= 0 for r in (*profile.encode.values(), *profile.decode.values()))
    ratios = profile.ratios["int8+zstd"]
    assert set(ratios) == set(arrays) and all(0 < r < 1 for k, r in ratios.items() if k != "flat")  # half zeros
    assert set(profile.to_json()) == set(profile.encode)


# -- plan.json ------------------------------------------------------------------------------------------------


def candidate_json(**extra) -> dict:
    base = {"id": "c001", "cut": ["n1"], "edge_nodes": 1, "edge_ms": 1.0, "transfer_bytes": 100, "transfer_ms": 2.0,
            "cloud_ms": 1.0, "total_ms": 4.5, "edge_memory_bytes": 10, "energy_mj": 3.0, "feasible": True}
    return {**base, **extra}


def test_candidate_codec_fields_round_trip_and_old_records_still_load():
    cand = plan_cuts(chain(), costs(), Link(1.0, 10.0, 1.0)).best.record()
    again = CandidateRecord.from_json(json.loads(json.dumps(cand.to_json())))
    assert again == cand and again.codec == "int8+zstd" and again.codecs == cand.codecs
    old = CandidateRecord.from_json(candidate_json())
    assert old.codec is None and old.encode_ms == 0.0 and old.codecs is None
    assert "codecs" not in old.to_json() and old.to_json()["codec"] is None
    row = PlanRow(5.0, "c001", "int8c+lz4")
    assert PlanRow.from_json(row.to_json()) == row
    assert PlanRow.from_json({"uplink_mbps": 5, "cut": "c001"}).codec is None


@pytest.mark.parametrize("bad", [{"codec": "jpeg"}, {"codec": "int8+gzip"}, {"encode_ms": -1},
                                 {"codecs": {"int8": {"transfer_bytes": 1}}}, {"codecs": {"zip": {}}},
                                 {"codecs_rejected": ["int8"]}])
def test_bad_codec_fields_name_the_candidate(bad):
    with pytest.raises(BundleError, match="c001"):
        CandidateRecord.from_json(candidate_json(**bad))
    with pytest.raises(BundleError, match="plan_table.codec"):
        PlanRow.from_json({"uplink_mbps": 1, "cut": "c001", "codec": "int9"})


def test_bundle_codec_for_prefers_the_rows_codec_at_that_rate():
    plan = {"artifacts": {"full": {"file": "full.onnx", "sha256": ""}},
            "candidates": [candidate_json(codec="int8"), candidate_json(id=CLOUD_ONLY, codec="int8c+zstd"),
                           candidate_json(id=EDGE_ONLY, codec=None)],
            "plan_table": [{"uplink_mbps": 0.5, "cut": CLOUD_ONLY, "codec": "int8c+zstd"},
                           {"uplink_mbps": 10.0, "cut": "c001", "codec": "int8+lz4"},
                           {"uplink_mbps": 100.0, "cut": CLOUD_ONLY, "codec": "fp16"}]}
    bundle = Bundle(Path("."), plan)
    assert bundle.codec_for("c001") == "int8"  # the candidate's (chosen at the plan's link)
    assert bundle.codec_for("c001", 20.0) == "int8+lz4"
    assert bundle.codec_for(CLOUD_ONLY, 200.0) == "fp16" and bundle.codec_for(CLOUD_ONLY, 1.0) == "int8c+zstd"
    assert bundle.codec_for(CLOUD_ONLY, 20.0) == "int8c+zstd"  # that row names another cut: the candidate's
    assert bundle.codec_for(EDGE_ONLY) is None and bundle.codec_for("nope") is None


def test_a_tensors_own_timing_replaces_the_fitted_rate():
    graph = chain()
    timed = codec_costs(tensor_encode={"int8+zstd": {"x": 7.0}}, tensor_decode={"int8+zstd": {"x": 3.0}})
    c = CostInputs(edge_ms={"n1": 50.0, "n2": 50.0}, cloud_ms={"n1": 0.5, "n2": 0.5}, codecs=timed)
    cand = evaluate_cut(graph, frozenset(), c, Link(1.0, 10.0, 1.0), Budgets(), CLOUD_ONLY)
    options = {o.codec: o for o, _, _ in cand.codec_options}
    assert (options["int8+zstd"].encode_ms, options["int8+zstd"].decode_ms) == (7.0, 3.0)
    assert options["int8"].encode_ms == pytest.approx(RATES["int8"].ms(80_000))  # not timed on x: the rate
    profile = measure_codecs({"a": np.ones((1, 2, 8, 8), np.float32)}, ("int8",))
    assert set(profile.tensor_encode["int8"]) == set(profile.tensor_decode["int8"]) == {"a"}


def test_many_tensors_are_timed_on_a_spread_of_sizes_and_every_one_gets_its_ratio():
    from partitioning.codecs import TIMED_TENSORS, _time_codecs

    rng = np.random.default_rng(0)
    arrays = {f"t{i:03d}": np.where(rng.random((1, 4, i + 1, 8)) < 0.5, 0.0, rng.standard_normal((1, 4, i + 1, 8)))
              .astype(np.float32) for i in range(TIMED_TENSORS * 2)}
    profile = measure_codecs(arrays, ("int8", "int8+zstd"))
    timed = set(profile.tensor_encode["int8+zstd"])
    assert len(timed) == TIMED_TENSORS and {"t000", f"t{2 * TIMED_TENSORS - 1:03d}"} <= timed  # both ends
    assert set(profile.ratios["int8+zstd"]) == set(arrays)  # every tensor's own ratio, timed or not
    # an untimed tensor's ratio is the one a timing of it measures
    untimed = sorted(set(arrays) - timed)[0]
    raw, wire = _time_codecs(arrays[untimed], "int8", ["zstd"])["zstd"][2:]
    assert profile.ratios["int8+zstd"][untimed] == pytest.approx(wire / raw)
    assert f"on {TIMED_TENSORS} of the model's {2 * TIMED_TENSORS} tensors" in profile.source


def test_a_tensor_with_infinities_is_never_sent_as_int8():
    """An attention mask's -inf (bert's `.pt` export: Where(mask, 0, -inf)) cannot be int8-quantized: the codec
    measurement skips it for int8/int8c (it stopped split-profile), and no cut through it offers those codecs."""
    from partitioning.codecs import codec_costs as from_profile

    masked = np.where(np.arange(64).reshape(1, 1, 8, 8) % 2 == 0, 0.0, -np.inf).astype(np.float32)
    profile = measure_codecs({"x": np.ones(X_SHAPE, np.float32), "n1": masked}, ("fp32", "fp16", "int8", "int8+zstd"))
    assert profile.unquantizable == {"n1"}
    assert "n1" not in profile.tensor_encode["int8"] and "n1" in profile.tensor_encode["fp16"]
    graph = chain()
    c = CostInputs(edge_ms={"n1": 50.0, "n2": 50.0}, cloud_ms={"n1": 0.5, "n2": 0.5}, codecs=from_profile(profile))
    through_mask = evaluate_cut(graph, frozenset({"n1"}), c, Link(1.0, 10.0, 1.0), Budgets(), "c001")
    assert {o.codec for o, _, _ in through_mask.codec_options} == {"fp32", "fp16"}
    at_input = evaluate_cut(graph, frozenset(), c, Link(1.0, 10.0, 1.0), Budgets(), CLOUD_ONLY)
    assert "int8" in {o.codec for o, _, _ in at_input.codec_options}
