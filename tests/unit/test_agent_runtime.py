"""The edge runtime: head then local tail equals the full model for every cut of a bundle."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.runtime import (
    CutRuntime,
    InputError,
    ModelLoadError,
    OrtRunner,
    RunnerCache,
    RuntimeOptions,
    prepare_inputs,
)
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle

# models/tiny_bundle.py builds its bundle with onnx (the [profile] extra): the [edge]-only job skips this file.
pytest.importorskip("onnx", reason="needs the [profile] extra (onnx) to build the test bundle")
pytestmark = pytest.mark.needs_profile

from models.tiny_bundle import make_tiny_bundle, sample_input  # noqa: E402

INT8_HEAD_ATOL = 0.03  # c1's int8 head: worst 0.006 on the logits over 64 inputs (see test_agent_split)
INT8_FULL_ATOL = 0.3  # edge-only int8 = the whole model quantized, logits included: worst 0.14


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return Bundle.load(make_tiny_bundle(tmp_path_factory.mktemp("agent_runtime") / "tiny"))


@pytest.fixture(scope="module")
def cache():
    return RunnerCache(RuntimeOptions(intra_op_threads=1, inter_op_threads=1))


@pytest.mark.parametrize("cut", ["c1", CLOUD_ONLY, EDGE_ONLY])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_head_then_tail_equals_the_full_model(bundle, cache, cut, precision):
    rt = CutRuntime(bundle, cut, precision, cache)
    full = ort.InferenceSession(str(bundle.full))
    x = sample_input(batch=3)
    acts = rt.run_head({"input": x})
    assert list(acts) == [t.name for t in rt.tensors]
    y = rt.run_tail(acts)["output"]
    want = full.run(None, {"input": x})[0]
    exact = precision == "fp32" or cut == CLOUD_ONLY
    atol = 1e-5 if exact else (INT8_FULL_ATOL if cut == EDGE_ONLY else INT8_HEAD_ATOL)
    np.testing.assert_allclose(y, want, atol=atol)
    assert rt.remote == (cut != EDGE_ONLY)
    assert rt.head_is_int8 == (precision == "int8" and cut != CLOUD_ONLY)


def test_runners_are_shared_per_file(bundle, cache):
    a = CutRuntime(bundle, CLOUD_ONLY, "fp32", cache)
    b = CutRuntime(bundle, EDGE_ONLY, "fp32", cache)
    assert a.tail is b.head  # full.onnx loaded once


def test_prepare_inputs_checks_name_shape_dtype():
    from models.manifest import TensorSpec

    specs = (TensorSpec("input", (None, 3, 16, 16), "float32"),)
    out = prepare_inputs(np.zeros((2, 3, 16, 16), np.float64), specs)
    assert out["input"].dtype == np.float32  # float64 -> float32 is a same-kind cast
    with pytest.raises(InputError, match=r"expected shape \('N', 3, 16, 16\), got \(3, 16, 16\)"):
        prepare_inputs(np.zeros((3, 16, 16), np.float32), specs)
    with pytest.raises(InputError, match="expected dtype float32, got complex64"):
        prepare_inputs(np.zeros((1, 3, 16, 16), np.complex64), specs)
    with pytest.raises(InputError, match="'input' is missing"):
        prepare_inputs({}, specs)


def test_bad_model_file_and_missing_provider_are_clear(tmp_path, bundle):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelLoadError, match="bad.onnx: onnxruntime cannot load it"):
        OrtRunner(bad)
    with pytest.raises(ModelLoadError, match="execution provider NoSuchExecutionProvider is not available"):
        OrtRunner(bundle.full, RuntimeOptions(providers=("NoSuchExecutionProvider",)))
