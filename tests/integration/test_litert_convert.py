"""A zoo model's head converted by onnx2tf (its own Python 3.12+ environment) and run on LiteRT, then its ONNX tail.

Needs the converter environment (partitioning/tflite.py): it is used where it is ready (the default place, or
$SPLITINFER_LITERT_CONVERTER) and made first when SPLITINFER_MAKE_LITERT_CONVERTER=1 (pip downloads onnx2tf and its
pinned dependencies, a few minutes once); otherwise these tests skip, saying how to make it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("ai_edge_litert", reason="the [litert] extra (ai-edge-litert) is part of [dev]")

from edge_agent.runtime import OrtRunner  # noqa: E402
from edge_agent.runtime_litert import LiteRTRunner  # noqa: E402
from models.inputs import synthetic_samples  # noqa: E402
from models.manifest import Bundle, TensorSpec  # noqa: E402
from partitioning.extract import extract_split, session  # noqa: E402
from partitioning.graph import build_cut_graph  # noqa: E402
from partitioning.quantize import int8_agreement, quantize_head  # noqa: E402
from partitioning.tflite import (  # noqa: E402
    FP32_RTOL,
    ConverterUnavailableError,
    convert_head,
    ensure_converter,
    verify_tflite,
)

pytestmark = [pytest.mark.needs_profile]


@pytest.fixture(scope="module")
def converter():
    make = os.environ.get("SPLITINFER_MAKE_LITERT_CONVERTER") == "1"
    try:
        return ensure_converter(create=make)
    except ConverterUnavailableError as exc:
        pytest.skip(f"no onnx2tf converter environment ({exc}); SPLITINFER_MAKE_LITERT_CONVERTER=1 makes it")


@pytest.fixture(scope="module")
def mobilenet_split(zoo_onnx, tmp_path_factory):
    """mobilenet_v2 cut after a middle inverted-residual block (a single NCHW tensor crosses the cut)."""
    path = zoo_onnx("mobilenet_v2")
    model = onnx.load(str(path))
    graph = build_cut_graph(model)
    order = graph.nodes
    for k in range(len(order) // 2, len(order)):  # the first single-tensor 4-D cut past the middle
        cut = graph.cut_tensors(frozenset(order[:k]))
        if len(cut) == 1 and len(graph.tensors[cut[0]].shape) == 4:
            break
    out = tmp_path_factory.mktemp("mnv2")
    head, tail = extract_split(model, cut, out / "head.onnx", out / "tail.onnx")
    inputs = [TensorSpec(i, (None, *graph.tensors[i].shape[1:]), graph.tensors[i].dtype) for i in graph.inputs]
    return path, head, tail, cut, inputs, out


@pytest.mark.slow
@pytest.mark.timeout(900)  # the zoo model's export and one onnx2tf run: about a minute on an idle CI machine
def test_a_zoo_models_litert_int8_head_then_its_onnx_tail_equals_the_model(converter, mobilenet_split):
    full_path, head, tail, cut, inputs, out = mobilenet_split
    calib = synthetic_samples(inputs, 16, seed=1)
    checks = synthetic_samples(inputs, 16, seed=2)
    fp32, int8 = out / "head.tflite", out / "head.int8.tflite"
    report = convert_head(converter, head, fp32, int8, calib)
    # The cut tensor leaves the .tflite under its ONNX name, in the ONNX layout the tail takes.
    runner = LiteRTRunner(int8)
    assert runner.output_names == tuple(cut) and runner.input_names == tuple(i.name for i in inputs)
    assert report["mapping"]["outputs"][0]["onnx"] == cut[0] and report["quant_type"] == "per-channel"
    full, tail_runner = session(full_path), OrtRunner(tail)
    reference = [full.run(None, x) for x in checks]
    name = full.get_outputs()[0].name
    litert = int8_agreement(reference, [[tail_runner.run(runner.run(x))[name]] for x in checks], "classification")
    # The same gate on the ONNX int8 head of the same cut, calibrated on the same samples: on these synthetic
    # inputs neither reaches the 0.9 top-1 gate at this cut of mobilenet_v2 (its logits are close), so the LiteRT
    # head is held to the ONNX int8 head's agreement, and its cut tensor to a relative error below the ONNX one's.
    quantize_head(head, out / "head.int8.onnx", calib)
    q_onnx = OrtRunner(out / "head.int8.onnx")
    onnx_int8 = int8_agreement(reference, [[tail_runner.run(q_onnx.run(x))[name]] for x in checks], "classification")
    assert litert["value"] >= onnx_int8["value"] - 0.1, (litert, onnx_int8)
    fp32_head = OrtRunner(head)
    for x in checks[:4]:
        want = fp32_head.run(x)[cut[0]]
        err_litert = np.linalg.norm(runner.run(x)[cut[0]] - want) / np.linalg.norm(want)
        err_onnx = np.linalg.norm(q_onnx.run(x)[cut[0]] - want) / np.linalg.norm(want)
        assert err_litert <= max(err_onnx, 0.1), (err_litert, err_onnx)
    # fp32: the LiteRT head then the ONNX tail is the model within FP32_RTOL; the bundle's record says the same.
    fp32_out = LiteRTRunner(fp32).run(checks[0])[cut[0]]
    np.testing.assert_allclose(fp32_out, fp32_head.run(checks[0])[cut[0]],
                               atol=FP32_RTOL * max(1.0, float(np.abs(fp32_out).max())))
    record = verify_tflite(Path(full_path), tail, fp32, int8, checks, "classification")
    assert record["fp32"]["passed"] and record["int8"]["value"] == litert["value"], record


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_split_profile_convert_adds_verified_tflite_heads_to_a_bundle(converter, tmp_path, capsys):
    from partitioning.cli import main

    bundle = tmp_path / "b"
    assert main(["tiny_cnn", "--device", "rpi4", "--out", str(bundle), "--refine", "0", "-q"]) == 0
    capsys.readouterr()
    assert main(["convert", str(bundle), "--edge-runtime", "litert", "--converter-env", str(converter.root), "-q"]) == 0
    printed = capsys.readouterr().out
    loaded = Bundle.load(bundle)  # every .tflite is listed with its sha256
    with_heads = [c for c in loaded.cut_ids if loaded.cut(c).head is not None]
    assert with_heads and all(f"litert   {c}" in printed for c in with_heads)
    for cut_id in with_heads:
        cut, record = loaded.cut(cut_id), loaded.plan["verification"]["cuts"][cut_id]["litert"]
        assert cut.head_tflite is not None and cut.head_int8_tflite is not None, record
        assert record["fp32"]["passed"], record
        runner = LiteRTRunner(cut.head_tflite)
        assert runner.output_names == tuple(t.name for t in cut.tensors)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_profiling_on_litert_times_graph_prefixes_and_names_the_runtime(converter, zoo_onnx, tmp_path):
    from models.manifest import sha256_file
    from partitioning.costtypes import NodeCosts
    from partitioning.device_profile import save_device_profile
    from partitioning.tflite import litert_host, litert_node_costs

    path = zoo_onnx("tiny_cnn")
    model = onnx.load(str(path))
    graph = build_cut_graph(model)
    inputs = [TensorSpec(i, (None, *graph.tensors[i].shape[1:]), graph.tensors[i].dtype) for i in graph.inputs]
    base = NodeCosts({n: 1.0 for n in graph.nodes}, 0.01, "measured", "onnxruntime (stand-in)")
    costs = litert_node_costs(path, model, graph, base, converter.convert, synthetic_samples(inputs, 4, seed=1),
                              count=2, repeats=5)
    assert set(costs.per_node_ms) == set(graph.nodes) and all(v >= 0 for v in costs.per_node_ms.values())
    assert costs.total_ms() > 0 and "graph prefixes timed" in costs.source
    out = tmp_path / "device.json"
    host = litert_host({"machine": "x86_64", "providers": ["CPUExecutionProvider"], "onnxruntime": "x"})
    save_device_profile(out, costs, model_sha256=sha256_file(path), host=host)
    saved = json.loads(out.read_text())
    assert saved["host"]["runtime"] == "litert" and saved["host"]["litert"].startswith("ai-edge-litert")
    assert "providers" not in saved["host"] and "no per-node profile" in saved["host"]["attribution"]


def test_without_a_converter_split_profile_convert_says_how_to_get_one(tmp_path, capsys):
    from models.tiny_bundle import make_tiny_bundle
    from partitioning.cli import main

    bundle = make_tiny_bundle(tmp_path / "b")
    plan_before = (bundle / "plan.json").read_text()
    assert main(["convert", str(bundle), "--converter-env", str(tmp_path / "env"),
                 "--converter-python", str(tmp_path / "no-python")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--converter-python" in err and "Python 3.12+" in err
    with pytest.raises(ConverterUnavailableError, match=r"pip install onnx2tf==\S+ && echo"):
        ensure_converter(tmp_path / "env", create=False)
    assert (bundle / "plan.json").read_text() == plan_before  # nothing half-written
