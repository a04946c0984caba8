"""Static int8 quantization of a head: it must not touch the application's logging."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.inputs import synthetic_samples
from models.manifest import TensorSpec
from partitioning.quantize import quantize_head


def _conv_model(path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def root_handler():
    root = logging.getLogger()
    handler, level = _Collect(), root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def test_quantizing_leaves_the_applications_logging_as_it_was(tmp_path, root_handler) -> None:
    path = tmp_path / "head.onnx"
    _conv_model(path)
    quant_logger = logging.getLogger("onnxruntime.quantization")
    before = (logging.getLogger().level, quant_logger.level)
    samples = synthetic_samples([TensorSpec("x", (None, 3, 8, 8), "float32")], 4)
    quantize_head(path, tmp_path / "head.int8.onnx", samples)
    assert (tmp_path / "head.int8.onnx").is_file()
    assert (logging.getLogger().level, quant_logger.level) == before
    logging.getLogger("some.application").warning("still heard")
    logging.warning("root still heard")
    assert root_handler.messages[-2:] == ["still heard", "root still heard"]


def _chain_model(path) -> None:
    """conv-relu-conv-relu-conv: heads end after the first or the second relu."""
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"w{i}")
               for i, shape in enumerate([(4, 3, 3, 3), (6, 4, 3, 3), (2, 6, 1, 1)])]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], weights),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_a_head_quantized_with_the_whole_models_ranges_is_the_head_calibrated_alone(tmp_path, method) -> None:
    """A tensor's range does not depend on where the model is cut: the ranges calibrated once on the whole model
    give each head (and each mixed-precision try) the int8 file that calibrating that head alone gives (for the
    histogram methods: alone and in the same chunks of samples, since their bins follow the first chunk)."""
    from partitioning.extract import extract_split
    from partitioning.quantize import HISTOGRAM_CHUNK, ActivationRanges, QuantConfig

    if not ActivationRanges.supported():
        pytest.skip("this onnxruntime's quantize_static takes no calibration cache")
    full = tmp_path / "full.onnx"
    _chain_model(full)
    samples = synthetic_samples([TensorSpec("x", (None, 3, 8, 8), "float32")], 8)
    ranges = ActivationRanges(full, samples, tmp_path / "ranges")
    model = onnx.load(str(full))
    tries = [("r0", ()), ("r1", ()), ("r1", ("conv1",))]  # two heads; the second with a node kept in float
    for i, (cut, floats) in enumerate(tries):
        head, _ = extract_split(model, [cut], tmp_path / f"h{i}.onnx", tmp_path / f"t{i}.onnx")
        own = None if method == "minmax" else ActivationRanges(head, samples, tmp_path / f"own{i}")
        alone = quantize_head(head, tmp_path / f"alone{i}.onnx", samples, QuantConfig(), method, floats, ranges=own)
        reused = quantize_head(head, tmp_path / f"reused{i}.onnx", samples, QuantConfig(), method, floats,
                               ranges=ranges)
        a, b = onnx.load(str(alone)).graph, onnx.load(str(reused)).graph
        assert [(n.op_type, list(n.input)) for n in a.node] == [(n.op_type, list(n.input)) for n in b.node]
        for ta, tb in zip(a.initializer, b.initializer, strict=True):
            assert ta.name == tb.name
            np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb), err_msg=ta.name)
    # one calibration of the whole model served every try (8 samples: two chunks for a histogram method)
    assert len(samples) > HISTOGRAM_CHUNK
    assert (ranges.computed, ranges.reused) == (1, len(tries))


def test_a_calibration_method_that_cannot_bin_a_tensor_is_one_failed_try_not_an_error(tmp_path) -> None:
    """A tensor whose values span less than the histogram methods' bins can resolve (here ~1e-44: float32
    denormals) makes numpy refuse the entropy and percentile histograms; `auto` goes on with the other methods
    (split-profile stopped on efficientnet_b0 with `Too many bins for data range`)."""
    from partitioning.quantize import QuantConfig, quantize_gated

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(1e-44, np.float32), "tiny")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "tiny"], ["y"], name="mul")]
    path = tmp_path / "head.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    samples = synthetic_samples([TensorSpec("x", (None, 3, 8, 8), "float32")], 4)

    def failing_gate(candidate):
        return {"metric": "relative_error", "value": 0.5, "threshold": 0.1, "passed": False, "samples": 4}

    result = quantize_gated(path, tmp_path / "head.int8.onnx", samples, failing_gate,
                            QuantConfig(calibration="auto", mixed=False))
    assert result.precision == "fp32" and result.calibration == "minmax"
    assert [(a["calibration"], "error" in a) for a in result.attempts] == [
        ("minmax", False), ("entropy", True), ("percentile", True)]
    assert "Too many bins" in result.attempts[1]["error"]
    with pytest.raises(ValueError, match="Too many bins"):  # asked for by name: the error is the answer
        quantize_gated(path, tmp_path / "q.onnx", samples, failing_gate, QuantConfig(calibration="entropy"))
