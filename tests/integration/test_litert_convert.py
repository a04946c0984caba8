"""A zoo model's head converted by onnx2tf (its own Python 3.12+ environment) and run on LiteRT, then its ONNX tail.

Needs the converter environment (partitioning/tflite.py): it is used where it is ready (the default place, or
$SPLITINFER_LITERT_CONVERTER) and made first when SPLITINFER_MAKE_LITERT_CONVERTER=1 (pip downloads onnx2tf and its
pinned dependencies, a few minutes once); otherwise these tests skip, saying how to make it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("ai_edge_litert", reason="the [litert] extra (ai-edge-litert) is part of [dev]")

from edge_agent.runtime import OrtRunner  # noqa: E402
from edge_agent.runtime_litert import LiteRTRunner  # noqa: E402
from models.inputs import synthetic_samples  # noqa: E402
from models.manifest import TensorSpec  # noqa: E402
from partitioning.extract import extract_split, session  # noqa: E402
from partitioning.graph import build_cut_graph  # noqa: E402
from partitioning.quantize import int8_agreement  # noqa: E402
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


def test_a_zoo_models_litert_int8_head_then_its_onnx_tail_equals_the_model(converter, mobilenet_split):
    full_path, head, tail, cut, inputs, out = mobilenet_split
    calib = synthetic_samples(inputs, 16, seed=1)
    checks = synthetic_samples(inputs, 8, seed=2)
    fp32, int8 = out / "head.tflite", out / "head.int8.tflite"
    report = convert_head(converter, head, fp32, int8, calib)
    # The cut tensor leaves the .tflite under its ONNX name, in the ONNX layout the tail takes.
    runner = LiteRTRunner(int8)
    assert runner.output_names == tuple(cut) and runner.input_names == tuple(i.name for i in inputs)
    assert report["mapping"]["outputs"][0]["onnx"] == cut[0]
    full, tail_runner = session(full_path), OrtRunner(tail)
    reference = [full.run(None, x) for x in checks]
    got = [[tail_runner.run(runner.run(x))[full.get_outputs()[0].name]] for x in checks]
    agreement = int8_agreement(reference, got, "classification")
    assert agreement["passed"], agreement
    # fp32: LiteRT's head then the tail is the model within FP32_RTOL; the bundle check records the same.
    fp32_out = LiteRTRunner(fp32).run(checks[0])[cut[0]]
    np.testing.assert_allclose(fp32_out, OrtRunner(head).run(checks[0])[cut[0]],
                               atol=FP32_RTOL * max(1.0, float(np.abs(fp32_out).max())))
    record = verify_tflite(Path(full_path), tail, fp32, int8, checks, "classification")
    assert record["fp32"]["passed"] and record["int8"]["passed"], record
