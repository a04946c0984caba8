"""Static node stats, roofline estimates, onnxruntime-measured costs and saved device profiles."""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from partitioning.attribution import Attribution
from partitioning.costs import host_facts, measure_node_costs, session_options
from partitioning.costtypes import DeviceProfileError, NodeCosts, Throughput
from partitioning.device_profile import (
    DEVICE_SCHEMA,
    MeasuredDeviceProfile,
    load_device_profile,
    resolve_device,
    save_device_profile,
)
from partitioning.devices import DEVICES, GPUS
from partitioning.estimate import estimate_node_costs
from partitioning.flops import node_stats, runtime_free_nodes
from partitioning.onnxwire import OnnxNode, identity_model, read_graph


def _weight(name: str, shape: tuple[int, ...], seed: int = 0) -> TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _cnn(size: int = 32, width: int = 16) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv(stride 2) -> Relu -> GAP -> Flatten -> Gemm -> Softmax, dynamic batch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    ones, zeros = np.ones(width, np.float32), np.zeros(width, np.float32)
    inits = [
        _weight("w1", (width, 3, 3, 3)), _weight("b1", (width,), 1),
        numpy_helper.from_array(ones, "bn_s"), numpy_helper.from_array(zeros, "bn_b"),
        numpy_helper.from_array(zeros, "bn_m"), numpy_helper.from_array(ones, "bn_v"),
        _weight("w2", (2 * width, width, 3, 3), 2), _weight("fc_w", (10, 2 * width), 3), _weight("fc_b", (10,), 4),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=1),
    ]
    return _model(nodes, [x], [y], inits)


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return _cnn()


@pytest.fixture(scope="module")
def cnn_path(cnn, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("costs") / "cnn.onnx"
    onnx.save(cnn, path)
    return path


@pytest.fixture(scope="module")
def measured(cnn_path) -> NodeCosts:
    return measure_node_costs(cnn_path, warmup=3, repeats=10, threads=1)


# --- flops -------------------------------------------------------------------------------------------


def test_conv_flops_bytes_and_weights_match_hand_computation(cnn) -> None:
    stats = node_stats(cnn)
    assert list(stats) == [n.name for n in cnn.graph.node]
    conv1 = stats["conv1"]
    # 2 * Cout * Hout * Wout * (Cin/group) * kh * kw + bias per output element
    assert conv1.flops == 2 * 16 * 32 * 32 * 3 * 3 * 3 + 16 * 32 * 32
    assert conv1.weight_bytes == (16 * 3 * 3 * 3 + 16) * 4
    assert conv1.bytes_in == 3 * 32 * 32 * 4 + conv1.weight_bytes
    assert conv1.bytes_out == 16 * 32 * 32 * 4
    assert conv1.op_class == "compute"
    assert stats["conv2"].flops == 2 * 32 * 16 * 16 * 16 * 3 * 3  # stride 2, no bias
    assert stats["fc"].flops == 2 * 1 * 10 * 32 + 10
    assert stats["relu1"].op_class == "memory" and stats["relu1"].flops == 16 * 32 * 32


def test_grouped_conv_and_broadcast_matmul_flops() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 5, 7])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "m")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="gconv", group=2, kernel_shape=[3, 3]),
        helper.make_node("MatMul", ["a", "b"], ["m"], name="mm"),
    ]
    model = _model(nodes, [x, a], outs, [_weight("w", (6, 2, 3, 3)), _weight("b", (7, 4))])
    stats = node_stats(model)
    assert stats["gconv"].flops == 2 * 6 * 6 * 6 * (4 // 2) * 3 * 3  # valid padding: 8 -> 6
    assert stats["mm"].flops == 2 * (2 * 3 * 5) * 4 * 7  # batch dims broadcast: 2*M*N*K per batch
    assert stats["mm"].weight_bytes == 7 * 4 * 4
    assert stats["mm"].bytes_out == 2 * 3 * 5 * 4 * 4


def test_unknown_op_gets_an_estimate_and_never_crashes() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="odd", domain="com.example")
    graph = helper.make_graph([node], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    stats = node_stats(model)
    assert stats["odd"].op_class == "memory" and stats["odd"].flops >= 0 and stats["odd"].bytes_in == 32


def test_runtime_free_nodes(cnn) -> None:
    free = runtime_free_nodes(cnn)
    assert free == {"bn1": "fused into conv1", "relu1": "fused into conv1", "relu2": "fused into conv2"}


# --- estimates ---------------------------------------------------------------------------------------


def test_estimates_cover_every_node_and_slower_devices_cost_more() -> None:
    cnn = _cnn(size=224, width=64)  # big enough that compute, not launch overhead, dominates
    totals = {}
    for name in ("rpi4", "rpi5", "jetson-orin-nano", "jetson-agx-orin"):
        costs = estimate_node_costs(cnn, resolve_device(name))
        assert costs.kind == "estimated" and name in costs.source
        assert set(costs.per_node_ms) == {n.name for n in cnn.graph.node}
        assert all(v >= 0 for v in costs.per_node_ms.values())
        assert costs.per_node_ms["bn1"] == 0.0 and costs.per_node_ms["conv1"] > 0
        totals[name] = costs.total_ms()
    assert totals["rpi4"] > totals["rpi5"] > totals["jetson-orin-nano"] > totals["jetson-agx-orin"]
    assert estimate_node_costs(cnn, GPUS["t4"]).total_ms() > estimate_node_costs(cnn, GPUS["h100"]).total_ms()


def test_int8_is_faster_than_fp32_where_the_device_has_int8_peak(cnn) -> None:
    device = DEVICES["jetson-orin-nano"]
    fp32 = estimate_node_costs(cnn, device, precision="fp32")
    int8 = estimate_node_costs(cnn, device, precision="int8")
    assert int8.total_ms() < fp32.total_ms()
    assert int8.per_node_ms["conv2"] < fp32.per_node_ms["conv2"]
    with pytest.raises(ValueError, match="precision must be one of"):
        estimate_node_costs(cnn, device, precision="int4")


def test_total_ms_sums_overhead_and_chosen_nodes() -> None:
    costs = NodeCosts({"a": 1.0, "b": 2.0, "c": 0.0}, 0.5, "estimated", "test")
    assert costs.total_ms() == 3.5
    assert costs.total_ms(["a", "c"]) == 1.5
    assert costs.total_ms([]) == 0.5


# --- measuring ---------------------------------------------------------------------------------------


def test_wire_reader_matches_onnx(cnn, cnn_path) -> None:
    nodes, initializers = read_graph(cnn_path)
    assert [(n.name, n.op_type, n.inputs, n.outputs) for n in nodes] == [
        (n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in cnn.graph.node
    ]
    assert initializers == {t.name for t in cnn.graph.initializer}


def test_wire_reader_rejects_garbage(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        read_graph(bad)


def test_measured_costs_cover_every_node_and_match_a_direct_timing(cnn, cnn_path, measured) -> None:
    assert measured.kind == "measured" and "measured on this host" in measured.source
    assert set(measured.per_node_ms) == {n.name for n in cnn.graph.node}
    assert all(v >= 0 for v in measured.per_node_ms.values()) and measured.overhead_ms >= 0
    assert measured.per_node_ms["conv1"] > 0 and measured.per_node_ms["conv2"] > 0
    assert measured.per_node_ms["bn1"] == 0.0  # folded into conv1 by onnxruntime
    assert measured.fitted is not None and measured.fitted.gflops > 0 and measured.fitted.gbps > 0
    session = ort.InferenceSession(str(cnn_path), session_options(1), providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    for _ in range(3):
        session.run(None, feed)
    walls = []
    for _ in range(10):
        start = time.perf_counter()
        session.run(None, feed)
        walls.append((time.perf_counter() - start) * 1000.0)
    direct = statistics.median(walls)
    assert direct / 3 <= measured.total_ms() <= direct * 3  # same ballpark; other tests share the CPU


def test_progress_is_reported_up_to_the_total(cnn_path) -> None:
    calls: list[tuple[int, int]] = []
    measure_node_costs(cnn_path, warmup=1, repeats=2, threads=1, batch=2, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == list(range(1, calls[-1][1] + 1))


def test_measure_rejects_bad_arguments(cnn_path) -> None:
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_node_costs(cnn_path, repeats=0)
    with pytest.raises(ValueError, match="min_seconds >= 0"):
        measure_node_costs(cnn_path, min_seconds=-1)


def test_the_wall_time_is_sampled_until_the_turns_span_min_seconds(cnn_path) -> None:
    quick = measure_node_costs(cnn_path, warmup=1, repeats=3, threads=1, min_seconds=0)
    assert re.search(r"median of 3 runs over [\d.]+ s", quick.source)  # the profiled runs' turns alone
    start = time.perf_counter()
    spread = measure_node_costs(cnn_path, warmup=1, repeats=3, threads=1, min_seconds=0.5)
    assert time.perf_counter() - start >= 0.5
    runs, span = re.search(r"median of (\d+) runs over ([\d.]+) s", spread.source).groups()
    assert int(runs) > 3 and float(span) >= 0.5
    assert set(spread.per_node_ms) == set(quick.per_node_ms) and spread.total_ms() > 0


def test_a_time_budget_keeps_fewer_profiled_runs_but_at_least_min_repeats(cnn_path) -> None:
    from partitioning.costs import MIN_REPEATS

    # a budget far below one run's time: the least that is kept, MIN_REPEATS after one warm-up
    tight = measure_node_costs(cnn_path, warmup=5, repeats=40, threads=1, min_seconds=0, max_seconds=1e-9)
    assert re.search(rf"median of {MIN_REPEATS} profiled runs after 1 warm-up", tight.source), tight.source
    # a budget that the runs fit in changes nothing
    roomy = measure_node_costs(cnn_path, warmup=1, repeats=3, threads=1, min_seconds=0, max_seconds=1e6)
    assert re.search(r"median of 3 profiled runs after 1 warm-up", roomy.source), roomy.source
    assert set(tight.per_node_ms) == set(roomy.per_node_ms)


def test_attribution_maps_fused_and_renamed_nodes() -> None:
    orig = [
        OnnxNode("conv", "Conv", ("x", "w"), ("c",)),
        OnnxNode("bn", "BatchNormalization", ("c", "s"), ("n",)),
        OnnxNode("relu", "Relu", ("n",), ("r",)),
        OnnxNode("mm", "MatMul", ("r", "k"), ("m",)),
        OnnxNode("div", "Div", ("m", "d"), ("q",)),
        OnnxNode("erf", "Erf", ("q",), ("e",)),
        OnnxNode("mul", "Mul", ("e", "q"), ("out",)),
    ]
    optimized = [
        OnnxNode("r_nchwc", "Conv", ("x_re", "w_re"), ("t0",)),
        OnnxNode("ReorderOutput", "ReorderOutput", ("t0",), ("r",)),
        OnnxNode("mm/MatMulScaleFusion/", "FusedMatMul", ("r", "k"), ("q",)),
        OnnxNode("Gelu_7", "Gelu", ("q",), ("out",)),
    ]
    mapper = Attribution(orig, {"w", "s", "k", "d"}, optimized)
    mapper.pair_unnamed([("Gelu_12", "Gelu", 1.0, {})])  # profile and saved graph number unnamed nodes apart
    assert mapper.owner("conv", "Conv") == "conv"
    assert mapper.owner("conv_token_3", "QLinearConv") == "conv"
    assert mapper.owner("r_nchwc", "Conv") == "conv"  # named after the fused output, work done by the conv
    assert mapper.owner("ReorderOutput", "ReorderOutput") == "relu"
    assert mapper.owner("mm/MatMulScaleFusion/", "FusedMatMul") == "mm"
    assert mapper.owner("Gelu_12", "Gelu") == "mul"  # no Gelu or compute op in {erf, mul}: the output's producer
    assert mapper.owner("who_knows", "Foo") is None
    times, lost = mapper.attribute([("conv", "Conv", 1.0, {}), ("ReorderOutput", "ReorderOutput", 0.5, {}),
                                    ("who_knows", "Foo", 0.25, {})])
    assert times == {"conv": 1.0, "relu": 0.5} and lost == 0.25


# --- saved device profiles ---------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_profile_round_trip_and_costs_for(cnn, cnn_path, measured, tmp_path) -> None:
    path = tmp_path / "pi.json"
    save_device_profile(path, measured, model_sha256=_sha(cnn_path), host=host_facts(1), name="my-pi",
                        active_w=6.0, idle_w=2.5)
    doc = json.loads(path.read_text())
    assert doc["schema"] == DEVICE_SCHEMA and doc["fitted"]["gflops"] > 0
    profile = resolve_device(str(path))
    assert isinstance(profile, MeasuredDeviceProfile) and profile.name == "my-pi"
    assert (profile.active_w, profile.idle_w) == (6.0, 2.5)
    assert dict(profile.costs.per_node_ms) == pytest.approx(dict(measured.per_node_ms))
    assert profile.costs.overhead_ms == pytest.approx(measured.overhead_ms)
    same = profile.costs_for(cnn, _sha(cnn_path))
    assert same.kind == "measured" and same.total_ms() == pytest.approx(measured.total_ms())
    resaved = profile.costs_for(cnn, "0" * 64)  # same nodes, other bytes (a re-saved copy)
    assert resaved.kind == "measured" and "matched by node names" in resaved.source
    other_model = _renamed(cnn)
    other = profile.costs_for(other_model, "0" * 64)
    assert other.kind == "estimated" and "measured profile my-pi" in other.source
    assert set(other.per_node_ms) == {n.name for n in other_model.graph.node} and other.total_ms() > 0
    assert estimate_node_costs(cnn, profile).kind == "estimated"


def test_profile_without_fit_cannot_estimate_other_models(cnn, cnn_path, measured, tmp_path) -> None:
    path = tmp_path / "nofit.json"
    bare = NodeCosts(measured.per_node_ms, measured.overhead_ms, "measured", "test")
    save_device_profile(path, bare, model_sha256=_sha(cnn_path), host={})
    with pytest.raises(DeviceProfileError, match="measure this model on the device"):
        load_device_profile(path).costs_for(_renamed(cnn), "1" * 64)


def _renamed(model):
    """A copy of `model` whose nodes have other names: another model as far as a profile can tell."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        node.name = f"other_{node.name}"
    return copy


def test_save_refuses_estimates_and_bad_sha(measured, tmp_path) -> None:
    with pytest.raises(ValueError, match="only measured"):
        save_device_profile(tmp_path / "x.json", NodeCosts({}, 0, "estimated", ""), model_sha256="a" * 64, host={})
    with pytest.raises(ValueError, match="64 lowercase hex"):
        save_device_profile(tmp_path / "x.json", measured, model_sha256="abc", host={})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ('{"schema": "other/v1"}', "expected schema 'splitinfer.device/v1'"),
        ('[1, 2]', "expected schema"),
        (json.dumps({"schema": DEVICE_SCHEMA, "model_sha256": "xyz"}), "model_sha256 must be 64 hex"),
        (json.dumps({"schema": DEVICE_SCHEMA, "model_sha256": "a" * 64, "per_node_ms": {}}), "non-empty"),
        (json.dumps({"schema": DEVICE_SCHEMA, "model_sha256": "a" * 64, "per_node_ms": {"n": -1}}),
         r"per_node_ms\['n'\]: expected a finite number >= 0"),
        (json.dumps({"schema": DEVICE_SCHEMA, "model_sha256": "a" * 64, "per_node_ms": {"n": 1},
                     "overhead_ms": "x"}), "overhead_ms"),
        (json.dumps({"schema": DEVICE_SCHEMA, "model_sha256": "a" * 64, "per_node_ms": {"n": 1},
                     "overhead_ms": 0, "host": {}, "fitted": {"gflops": 0, "gbps": 1, "launch_ms": 0}}),
         "must be > 0"),
    ],
)
def test_bad_profile_files_raise_clear_errors(tmp_path, content, message) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DeviceProfileError, match=message):
        load_device_profile(path)


def test_profile_for_another_graph_with_same_sha_is_refused(cnn, measured) -> None:
    fit = Throughput(10.0, 1.0, 0.01, "test")
    costs = NodeCosts({"other": 1.0}, 0.0, "measured", "test", fit)
    profile = MeasuredDeviceProfile("p", "a" * 64, {}, costs, fit)
    with pytest.raises(DeviceProfileError, match="not in it"):
        profile.costs_for(cnn, "a" * 64)


def test_dynamic_non_batch_dims_need_explicit_shapes(tmp_path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "L"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    path = tmp_path / "seq.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y], []), path)
    with pytest.raises(ValueError, match="input 'x' has dynamic dimension 2 .*input_shapes"):
        measure_node_costs(path, warmup=0, repeats=1)
    costs = measure_node_costs(path, warmup=0, repeats=1, input_shapes={"x": (1, 4, 16)})
    assert set(costs.per_node_ms) == {"relu"}


# --- what a cut adds ---------------------------------------------------------------------------------


def test_identity_model_is_valid_onnx_written_without_onnx() -> None:
    model = onnx.load_from_string(identity_model())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Identity"]
    session = ort.InferenceSession(identity_model(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.array([2.5], np.float32)})[0].tolist() == [2.5]


def test_measured_costs_carry_the_fixed_run_cost_and_boundary_rates(cnn_path, measured, tmp_path) -> None:
    assert 0 < measured.overhead_ms < measured.total_ms()
    assert "one-Identity model" in measured.source
    rates = measured.boundary
    assert rates is not None and rates.launch_ms == measured.fitted.launch_ms
    # the Relu probes' slope in GB/s: a unit slip (ms for s, bits for bytes) would land far outside memory speeds
    assert 0.5 < rates.gbps < 5000
    # reorders exactly when onnxruntime put layout conversions into the graph it ran (NCHWc on x86)
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(cnn_path), options, providers=["CPUExecutionProvider"])
    ran = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert rates.reorders == bool(ran & {"ReorderInput", "ReorderOutput"})
    # the reorders back from the blocked layout are kept apart too, as part of the node charged with them
    assert bool(measured.reorder_out_ms) == ("ReorderOutput" in ran)
    for node, ms in measured.reorder_out_ms.items():
        assert 0 <= ms <= measured.per_node_ms[node]


def test_profile_keeps_boundary_rates_and_old_profiles_fall_back_to_the_fit(cnn_path, measured, tmp_path) -> None:
    path = tmp_path / "dev.json"
    save_device_profile(path, measured, model_sha256=_sha(cnn_path), host={})
    assert load_device_profile(path).costs.boundary == measured.boundary
    doc = json.loads(path.read_text())
    del doc["boundary"]  # a profile saved before boundary rates were measured
    path.write_text(json.dumps(doc))
    old = load_device_profile(path).costs.boundary
    assert (old.launch_ms, old.gbps, old.reorders) == (measured.fitted.launch_ms, measured.fitted.gbps, False)
    doc["boundary"] = {"launch_ms": 0.01, "gbps": 0, "reorders": True}
    path.write_text(json.dumps(doc))
    with pytest.raises(DeviceProfileError, match="boundary.gbps must be > 0"):
        load_device_profile(path)
    doc["boundary"] = {"launch_ms": 0.01, "gbps": 1, "reorders": "yes"}
    path.write_text(json.dumps(doc))
    with pytest.raises(DeviceProfileError, match="boundary must be an object"):
        load_device_profile(path)
