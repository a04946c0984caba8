"""load_model: every source format, shape handling, ONNX normalization, and a clear error for each bad input."""

from __future__ import annotations

import ast
import hashlib
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from models.convert import normalize_onnx, to_onnx  # noqa: E402
from models.loaders import ModelLoadError, detect_format, load_model, parse_input_shape  # noqa: E402
from models.zoo import build_zoo_model  # noqa: E402

SHAPE = (1, 3, 32, 32)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny():
    """The tiny_cnn zoo model and a seeded batch-2 input to compare outputs on."""
    model = build_zoo_model("tiny_cnn")
    x = torch.randn((2, *SHAPE[1:]), generator=torch.Generator().manual_seed(7))
    return model, x


@pytest.fixture(scope="session")
def files(tmp_path_factory, tiny):
    """tiny_cnn saved once per session in every source format (and some broken files)."""
    model, _ = tiny
    root = tmp_path_factory.mktemp("sources")
    x = torch.randn(SHAPE)
    with warnings.catch_warnings():  # TracerWarnings about the model's Python control flow
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, x), root / "traced.pt")
        torch.jit.save(torch.jit.script(model), root / "scripted.pt")
    torch.export.save(torch.export.export(model, (x,)), root / "static.pt2")
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (torch.randn(2, *SHAPE[1:]),), dynamic_shapes=({0: batch},)),
                      root / "dynamic.pt2")
    program = torch.export.export(model, (x,))
    program._example_inputs = None  # like archives from older torch: shapes come from the graph's placeholders
    torch.export.save(program, root / "no_examples.pt2")
    torch.save(model, root / "pickled.pt")
    torch.save(model.state_dict(), root / "weights.pt")
    to_onnx(model, (x,), root / "tiny.onnx")
    return root


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def _assert_matches_torch(loaded, tiny):
    model, x = tiny
    with torch.no_grad():
        expected = model(x).numpy()
    got = _run(loaded.onnx_path, x)  # batch 2: the batch dimension is dynamic
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


# -- each source format ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file, fmt, kwargs",
    [
        ("traced.pt", "torchscript", {}),  # a traced archive records its input shape
        ("scripted.pt", "torchscript", {"input_shape": SHAPE}),
        ("static.pt2", "torch.export", {}),
        ("dynamic.pt2", "torch.export", {}),
        ("no_examples.pt2", "torch.export", {}),
        ("tiny.onnx", "onnx", {}),
        ("pickled.pt", "pickle", {"allow_pickle": True, "input_shape": SHAPE}),
    ],
)
def test_each_source_format_loads(files, tiny, tmp_path, file, fmt, kwargs):
    messages: list[str] = []
    loaded = load_model(str(files / file), tmp_path, progress=messages.append, **kwargs)
    assert loaded.format == fmt
    assert loaded.name == Path(file).stem
    assert loaded.source == str(files / file)
    assert loaded.sha256 == hashlib.sha256((files / file).read_bytes()).hexdigest()
    assert loaded.onnx_path.parent == tmp_path and loaded.onnx_path.is_file()
    assert [(s.name, s.shape, s.dtype) for s in loaded.inputs] == [("input", (None, 3, 32, 32), "float32")]
    assert [(s.name, s.shape, s.dtype) for s in loaded.outputs] == [("output", (None, 10), "float32")]
    assert loaded.task == "classification"
    assert messages, "progress is reported"
    _assert_matches_torch(loaded, tiny)


def test_zoo_name_loads_with_its_task_and_onnx_hash(tmp_path, tiny):
    loaded = load_model("tiny_cnn", tmp_path)
    assert (loaded.format, loaded.name, loaded.task) == ("zoo", "tiny_cnn", "classification")
    assert loaded.sha256 == hashlib.sha256(loaded.onnx_path.read_bytes()).hexdigest()
    assert loaded.inputs[0].shape == (None, 3, 32, 32)
    _assert_matches_torch(loaded, tiny)


def test_a_file_wins_over_a_zoo_name(files, tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny_cnn").write_bytes((files / "tiny.onnx").read_bytes())
    monkeypatch.chdir(tmp_path / "src")
    assert load_model("tiny_cnn", tmp_path / "work").format == "onnx"


def test_format_is_detected_by_content_not_extension(files, tmp_path):
    renamed = {"a.onnx": "static.pt2", "b.bin": "traced.pt", "c.pt2": "pickled.pt", "d.pt": "tiny.onnx"}
    for new, old in renamed.items():
        (tmp_path / new).write_bytes((files / old).read_bytes())
    found = {new: detect_format(tmp_path / new) for new in renamed}
    assert found == {"a.onnx": "torch.export", "b.bin": "torchscript", "c.pt2": "pickle", "d.pt": "onnx"}
    assert load_model(str(tmp_path / "d.pt"), tmp_path / "work").format == "onnx"


def test_onnx_in_the_workdir_is_not_overwritten(files, tmp_path):
    src = tmp_path / "tiny.onnx"
    src.write_bytes((files / "tiny.onnx").read_bytes())
    before = src.read_bytes()
    loaded = load_model(str(src), tmp_path)
    assert loaded.onnx_path != src and src.read_bytes() == before


# -- ONNX normalization ----------------------------------------------------------------------------


def _onnx_model(nodes, inputs, outputs, initializers=(), **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, **kw)


def test_fixed_batch_onnx_is_made_dynamic_when_the_graph_allows(tmp_path):
    model = _onnx_model(
        [helper.make_node("Relu", ["input"], ["output"], name="")],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(model, tmp_path / "fixed.onnx")
    loaded = load_model(str(tmp_path / "fixed.onnx"), tmp_path / "work")
    assert loaded.inputs[0].shape == (None, 4) and loaded.outputs[0].shape == (None, 4)
    assert loaded.task == "classification"


def test_baked_batch_onnx_is_kept_fixed_and_says_so(tmp_path):
    # a Reshape to (2, 2) mixes the batch into another dimension (one to (1, 4) now keeps the batch: test_conversion_*)
    shape = numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "shape")
    model = _onnx_model(
        [helper.make_node("Reshape", ["input", "shape"], ["output"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 2])],
        [shape],
    )
    onnx.save(model, tmp_path / "baked.onnx")
    messages: list[str] = []
    loaded = load_model(str(tmp_path / "baked.onnx"), tmp_path / "work", progress=messages.append)
    assert loaded.inputs[0].shape == (1, 2, 2)
    assert any("batch dimension is fixed" in m for m in messages)


def test_onnx_without_full_input_shape_needs_input_shape(tmp_path):
    model = _onnx_model(
        [helper.make_node("Relu", ["input"], ["output"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "features"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "features"])],
    )
    onnx.save(model, tmp_path / "sym.onnx")
    with pytest.raises(ModelLoadError, match=r"does not record its full shape; pass --input-shape 1x3x224x224"):
        load_model(str(tmp_path / "sym.onnx"), tmp_path / "work")
    loaded = load_model(str(tmp_path / "sym.onnx"), tmp_path / "work", input_shape=(1, 6))
    assert loaded.inputs[0].shape == (None, 6) and loaded.outputs[0].shape == (None, 6)


def test_nodes_get_unique_names_and_external_data_is_embedded(tmp_path):
    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(1, 4096), "w")
    model = _onnx_model(
        [helper.make_node("Add", ["input", "w"], ["a"], name="dup"),
         helper.make_node("Relu", ["a"], ["b"], name="dup"),
         helper.make_node("Relu", ["b"], ["output"], name="")],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4096])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4096])],
        [weight],
    )
    user = tmp_path / "user"
    user.mkdir()
    onnx.save(model, user / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    loaded = load_model(str(user / "ext.onnx"), tmp_path / "work")
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before, "the user's files are untouched"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["ext.onnx"]
    out = onnx.load(str(loaded.onnx_path), load_external_data=False)
    names = [n.name for n in out.graph.node]
    assert all(names) and len(set(names)) == 3 and "dup" in names
    assert not any(t.data_location == TensorProto.EXTERNAL for t in out.graph.initializer)


def test_normalize_embeds_and_removes_the_exporters_data_file(tmp_path):
    weight = numpy_helper.from_array(np.ones((1, 8), dtype=np.float32), "w")
    model = _onnx_model(
        [helper.make_node("Mul", ["input", "w"], ["output"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8])],
        [weight],
    )
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    normalize_onnx(tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    out = onnx.load(str(tmp_path / "m.onnx"))
    assert out.graph.node[0].name == "Mul_0" and len(out.graph.value_info) == 0  # no intermediate tensors
    onnx.checker.check_model(out)


# -- bad input -------------------------------------------------------------------------------------


def _bad_files(root: Path, files: Path) -> dict[str, Path]:
    good = (files / "traced.pt").read_bytes()
    made = {
        "empty": (b"", "empty.pt"),
        "truncated": (good[: len(good) // 2], "half.pt"),
        "text": (b"hello, this is a readme and not a model\n" * 4, "readme.txt"),
        "jpeg": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(range(256)), "photo.jpg"),
        "truncated_onnx": ((files / "tiny.onnx").read_bytes()[:300], "cut.onnx"),
    }
    out = {}
    for key, (data, name) in made.items():
        (root / name).write_bytes(data)
        out[key] = root / name
    with zipfile.ZipFile(root / "other.zip", "w") as zf:
        zf.writestr("docs/readme.txt", "not a model")
    out["other_zip"] = root / "other.zip"
    with zipfile.ZipFile(root / "broken_ts.pt", "w") as zf:
        zf.writestr("archive/code/__torch__/m.py", "garbage(")
        zf.writestr("archive/constants.pkl", b"\x00\x01")
        zf.writestr("archive/data.pkl", b"\x00\x01")
    out["broken_torchscript"] = root / "broken_ts.pt"
    return out


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", r"no such file"),
        ("directory", r"is a directory"),
        ("empty", r"is empty \(0 bytes\)"),
        ("truncated", r"damaged or truncated zip archive"),
        ("text", r"not a model file \(looks like a text file\)"),
        ("jpeg", r"not a model file \(looks like a JPEG image\)"),
        ("truncated_onnx", r"not a valid ONNX model"),
        ("other_zip", r"zip archive but not a torch model \(members: docs/readme.txt\)"),
        ("broken_torchscript", r"broken_ts.pt: "),
        ("unknown_zoo", r"no zoo model of that name; the zoo has: tiny_cnn, .*resnet18"),
        ("scripted_without_shape", r"does not record its input shape; pass --input-shape 1x3x224x224"),
        ("shape_conflict", r"records input shape 1x3x32x32, not --input-shape 1x3x64x64"),
        ("nonsense_shape", r"expected positive integers"),
        ("state_dict", r"unpickled a .*Dict.*expected an nn.Module"),
    ],
)
def test_bad_input_gets_one_clear_line(files, tmp_path, case, fragment):
    bad = _bad_files(tmp_path, files)
    kwargs: dict = {}
    source: str
    if case == "missing":
        source = str(tmp_path / "nope.pt")
    elif case == "directory":
        source = str(tmp_path)
    elif case == "unknown_zoo":
        source = "resnet19"
    elif case == "scripted_without_shape":
        source = str(files / "scripted.pt")
    elif case == "shape_conflict":
        source, kwargs = str(files / "traced.pt"), {"input_shape": (1, 3, 64, 64)}
    elif case == "nonsense_shape":
        source, kwargs = "tiny_cnn", {"input_shape": (1, 0, -3)}
    elif case == "state_dict":
        source, kwargs = str(files / "weights.pt"), {"allow_pickle": True}
    else:
        source = str(bad[case])
    with pytest.raises(ModelLoadError, match=fragment) as info:
        load_model(source, tmp_path / "work", **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    if case not in ("unknown_zoo", "nonsense_shape"):
        assert Path(source).name in message, "the message names the file"


def test_pickle_is_refused_without_the_flag(files, tmp_path):
    refusal = r"unpickling runs arbitrary code.*--allow-pickle only for files you trust"
    with pytest.raises(ModelLoadError, match=refusal):
        load_model(str(files / "pickled.pt"), tmp_path, input_shape=SHAPE)
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize(
    "text, expected",
    [("1x3x224x224", (1, 3, 224, 224)), ("1,3,32,32", (1, 3, 32, 32)), (" 2 x 16 ", (2, 16)), ("1X4", (1, 4))],
)
def test_parse_input_shape(text, expected):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1x0x3", "1x-3x4", "1.5x3", "1xx3", "224*224"])
def test_parse_input_shape_rejects_nonsense(text):
    with pytest.raises(ModelLoadError, match=r"expected positive integers joined by 'x'.*1x3x224x224"):
        parse_input_shape(text)


def test_loaders_and_convert_import_torch_and_onnx_lazily():
    for module in ("models/loaders.py", "models/convert.py"):
        tree = ast.parse((ROOT / module).read_text())
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top_level for a in n.names} | {
            (n.module or "").split(".")[0] for n in top_level if isinstance(n, ast.ImportFrom)
        }
        assert not names & {"torch", "onnx", "onnxruntime"}, f"{module} imports {names} at module level"


# -- conversion details ----------------------------------------------------------------------------


class _TwoInTwoOut(torch.nn.Module):
    def forward(self, a, b):
        return a + b, (a * b).sum(1)


class _DataDependent(torch.nn.Module):
    """torch.export cannot guard on a tensor's value; the legacy tracer records one branch."""

    def forward(self, x):
        width = 2 * (int(x.abs().sum().item() > 0) + 1)
        return x.reshape(x.shape[0], -1)[:, :width]


def test_several_inputs_and_outputs_get_numbered_names(tmp_path):
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    model = onnx.load(str(to_onnx(_TwoInTwoOut(), (a, b), tmp_path / "two.onnx")))
    assert [i.name for i in model.graph.input] == ["input", "input_1"]
    assert [o.name for o in model.graph.output] == ["output", "output_1"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in model.graph.input)


def test_dynamo_failure_falls_back_to_the_legacy_exporter_and_says_so(tmp_path, caplog, capsys):
    x = torch.randn(1, 3, 2, 2)
    with caplog.at_level("WARNING", logger="models.convert"):
        path = to_onnx(_DataDependent(), (x,), tmp_path / "dd.onnx")
    assert any("falling back to the legacy exporter" in r.getMessage() for r in caplog.records)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, _DataDependent()(x).numpy(), rtol=1e-6)
    captured = capsys.readouterr()
    assert "def forward" not in captured.err + captured.out, "the exporter's chatter is suppressed"


def test_to_onnx_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(ValueError, match="expected torch.nn.Module, ScriptModule or ExportedProgram"):
        to_onnx(lambda x: x, (torch.randn(1, 2),), tmp_path / "f.onnx")
