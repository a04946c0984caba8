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
