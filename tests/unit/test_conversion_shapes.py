"""Shape arithmetic a tracer leaves (Shape -> Gather -> Unsqueeze -> Concat -> Reshape) is folded with the concrete
input shape, keeping the batch dynamic; what varies with the batch and cannot be folded never crosses a cut;
synthetic integer inputs stay valid indices where the graph analysis runs the model."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.convert import fold_shape_subgraphs, make_batch_dynamic
from partitioning.extract import session
from partitioning.flops import node_stats
from partitioning.graph import build_cut_graph
from partitioning.planner import _usable_prefix


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def _const(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _traced_view(path):
    """x (batch, 4, 3, 3) -> Relu -> view(x.shape[0], 4, -1) -> Relu, as the legacy exporter writes it."""
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["b"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"], name="unsqueeze"),
        helper.make_node("Concat", ["b1", "rest"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["r", "target"], ["v"], name="reshape"),
        helper.make_node("Relu", ["v"], ["output"], name="relu2"),
    ]
    inits = [_const("zero", 0), _const("axes", [0]), _const("rest", [4, -1])]
    model = _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 3, 3])],
                   [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4, 9])], inits)
    onnx.save(model, path)
    return path


def test_a_traced_view_is_folded_to_a_constant_and_keeps_the_batch(tmp_path):
    path = _traced_view(tmp_path / "m.onnx")
    assert len(build_cut_graph(onnx.load(str(path))).nodes) == 7  # today: the shape chain is searched too
    result = fold_shape_subgraphs(path)
    assert result.folded == 1 and not result.kept
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["Relu", "Reshape", "Relu"]
    assert len(build_cut_graph(model).nodes) == 3
    assert all(s.shapes_known for s in node_stats(model).values())
    x = np.random.default_rng(0).standard_normal((3, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(session(path).run(None, {"input": x})[0], np.maximum(x, 0).reshape(3, 4, 9))


def test_a_shape_value_that_varies_with_the_batch_stays_and_is_never_a_cut(tmp_path):
    """expand(x.shape[0], 2): the batch-sized target cannot be a constant; no cut may carry it."""
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"], name="shape"),
        helper.make_node("Slice", ["s", "zero", "one"], ["b"], name="slice"),
        helper.make_node("Concat", ["b", "two"], ["target"], name="concat", axis=0),
        helper.make_node("Relu", ["r"], ["r2"], name="relu2"),
        helper.make_node("Expand", ["token", "target"], ["e"], name="expand"),
        helper.make_node("Add", ["r2", "e"], ["output"], name="add"),
    ]
    inits = [_const("zero", [0]), _const("one", [1]), _const("two", [2]),
             numpy_helper.from_array(np.ones((1, 2), np.float32), "token")]
    path = tmp_path / "e.onnx"
    onnx.save(_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
                     [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])], inits), path)
    result = fold_shape_subgraphs(path)
    assert result.folded == 0 and result.kept == ("e",)  # the expanded token: its value follows the batch
    graph = build_cut_graph(onnx.load(str(path)))
    assert graph.local_tensors == {"s", "b", "target"}  # the shape values, not the expanded (float) token
    order = list(graph.nodes)
    after_concat = order.index("concat") + 1
    assert after_concat < order.index("expand")  # a prefix ending there would carry the target
    assert not _usable_prefix(graph, after_concat)
    assert _usable_prefix(graph, order.index("add"))


def test_a_reshape_to_batch_one_keeps_the_batch_when_two_samples_stay_apart(tmp_path):
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["output"], name="view", allowzero=1)]
    path = tmp_path / "b.onnx"
    onnx.save(_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 2])],
                     [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])], [_const("shape", [1, 4])]),
              path)
    assert make_batch_dynamic(path)
    x = np.arange(16, dtype=np.float32).reshape(4, 2, 2)
    assert session(path).run(None, {"input": x})[0].shape == (4, 4)



def test_chained_reshapes_to_batch_one_all_keep_the_batch(tmp_path):
    """As torch.export writes YOLO's head at batch 1: a view of a Concat of views ([1, 4, 16, 8400])."""
    nodes = [helper.make_node("Reshape", ["input", "s1"], ["a"], name="view1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "s2"], ["output"], name="view2")]
    path = tmp_path / "c.onnx"
    onnx.save(_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 2, 2])],
                     [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, 2, 2])],
                     [_const("s1", [1, 2, -1]), _const("s2", [1, 2, 2, 2])]), path)
    assert make_batch_dynamic(path)
    x = np.arange(24, dtype=np.float32).reshape(3, 2, 2, 2)
    np.testing.assert_array_equal(session(path).run(None, {"input": x})[0], x.reshape(3, 2, 2, 2))


def test_a_resize_to_sizes_of_batch_one_resizes_the_spatial_axes_and_keeps_the_batch(tmp_path):
    """torch.export writes an upsample at batch 1 as Resize(sizes=[1, C, H, W]) (lraspp, deeplabv3 as .pt2)."""
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu"),
             helper.make_node("Resize", ["r", "", "", "sizes"], ["output"], name="up", mode="linear")]
    path = tmp_path / "r.onnx"
    onnx.save(_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
                     [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, 8, 8])],
                     [_const("sizes", [1, 2, 8, 8])]), path)
    assert make_batch_dynamic(path)
    x = np.random.default_rng(0).standard_normal((3, 2, 4, 4)).astype(np.float32)
    got = session(path).run(None, {"input": x})[0]
    assert got.shape == (3, 2, 8, 8)
    one = session(path).run(None, {"input": x[1:2]})[0]
    np.testing.assert_allclose(got[1:2], one, rtol=1e-6)

def test_the_graph_probe_draws_token_ids_below_the_vocabulary():
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed", axis=0),
             helper.make_node("Relu", ["e"], ["output"], name="relu")]
    table = numpy_helper.from_array(np.ones((5, 3), np.float32), "table")
    model = _model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 64])],
                   [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 64, 3])], [table])
    graph = build_cut_graph(model)  # ids from [0, 10) would index past the 5-row table: onnxruntime refuses
    assert graph.tensors["e"].shape == (1, 64, 3)


def test_a_batch_baked_into_the_graph_stays_fixed_without_a_line_on_stderr(tmp_path, capfd):
    """The batch-2 probe fails inside onnxruntime: neither its error line nor a bare log warning reaches stderr
    (the loader says "fixed" once, as a progress line)."""
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["output"], name="view")]
    path = tmp_path / "baked.onnx"
    onnx.save(_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 2])],
                     [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 2])], [_const("shape", [2, 2])]),
              path)
    capfd.readouterr()
    assert not make_batch_dynamic(path)
    assert capfd.readouterr().err == ""


def test_the_constants_that_fed_a_folded_shape_go_with_it(tmp_path, capfd):
    """The legacy exporter writes a view's indices as Constant nodes; left behind after the fold, onnxruntime
    drops each one with a warning line on stderr (hundreds on a ViT traced as model.pt)."""
    path = _traced_view(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for name in ("zero", "axes"):  # as Constant nodes, not initializers
        tensor = next(t for t in model.graph.initializer if t.name == name)
        model.graph.initializer.remove(tensor)
        model.graph.node.insert(0, helper.make_node("Constant", [], [name], name=f"const_{name}", value=tensor))
    onnx.save(model, str(path))
    assert fold_shape_subgraphs(path).folded == 1
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["Relu", "Reshape", "Relu"]
    capfd.readouterr()
    from models.ortopts import make_session

    make_session(model.SerializeToString(), threads=1, inter_threads=None, log_severity=2)  # warnings shown
    assert "onnxruntime" not in capfd.readouterr().err
