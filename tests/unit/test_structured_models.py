"""Models beyond one float tensor in and out: structured outputs (dict, namedtuple, ModelOutput, nested) become
named ONNX outputs in every format, integer and multiple inputs load with their dtypes, and bundles get names."""

from __future__ import annotations

import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from models.convert import integer_input_highs, output_structure, to_onnx
from models.inputs import synthetic_samples
from models.loaders import InputHint, ModelLoadError, default_model_name, load_model, parse_input_hints
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle
from models.testnets import SEGMENTER_SHAPE, TextOutput, build_segmenter, build_text_model, text_inputs
from partitioning import profile
from partitioning.cli import build_parser, options_from_args
from partitioning.extract import extract_split, session

Pair = namedtuple("Pair", ["left", "right"])


class _Nested(nn.Module):
    def forward(self, x):
        return x * 2, {"a": x + 1, "b": [x - 1, Pair(x.sum(1), x.mean(1))]}


class _Named(nn.Module):
    def forward(self, x):
        return Pair(x + 1, x * 3)


class _ModelOutput(nn.Module):
    def forward(self, x):
        return TextOutput(logits=x.sum(1), last_hidden_state=x * 2)


@pytest.mark.parametrize("module, names", [
    (_Nested, ["0", "1.a", "1.b.0", "1.b.1.left", "1.b.1.right"]),
    (_Named, ["left", "right"]),
    (_ModelOutput, ["logits", "last_hidden_state"]),
])
def test_structured_outputs_become_named_onnx_outputs(module, names, tmp_path):
    x = torch.randn(1, 4, 3)
    model = module().eval()
    assert output_structure(model(x)).names == names
    path = to_onnx(model, (x,), tmp_path / "m.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == names
    flat = [t.numpy() for _, t in output_structure(model(x)).leaves]
    got = session(path).run(None, {"input": x.numpy()})
    for want, have in zip(flat, got):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)


def test_flat_tuples_keep_their_numbered_names():
    x = torch.randn(1, 2)
    assert output_structure((x, x)).names == ["output", "output_1"]
    assert output_structure(x).names == ["output"]
    assert not output_structure([x, x]).needs_flattening


def _save_segmenter(fmt: str, d: Path) -> Path:
    model, x = build_segmenter(), torch.randn(SEGMENTER_SHAPE, generator=torch.Generator().manual_seed(1))
    d.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "traced":
            torch.jit.trace(model, (x,), strict=False).save(str(d / "model.pt"))
            return d / "model.pt"
        if fmt == "scripted":
            torch.jit.script(model).save(str(d / "model.pt"))
            return d / "model.pt"
        if fmt == "pt2":
            torch.export.save(torch.export.export(model, (x,)), str(d / "seg.pt2"))
            return d / "seg.pt2"
    return to_onnx(model, (x,), d / "seg.onnx")


def _split_outputs(bundle: Bundle, cut_id: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Head then tail by name, as agent and cloud run them: the model outputs under their names."""
    cut = bundle.cut(cut_id)
    return _run_parts([p for p in (cut.head, cut.tail) if p is not None], feeds, [o.name for o in bundle.outputs])


def _run_parts(parts: list[Path], feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    values = dict(feeds)
    for part in parts:
        sess = session(part)
        outs = [o.name for o in sess.get_outputs()]
        values.update(zip(outs, sess.run(outs, {i.name: values[i.name] for i in sess.get_inputs()})))
    return {name: values[name] for name in names}


def _check_bundle(out: Path, feeds: dict[str, np.ndarray], names: list[str], tmp: Path, atol: float = 1e-4) -> Bundle:
    """Every bundle cut and a spread of the plan's middle candidates, head then tail, equal full.onnx by name."""
    bundle = Bundle.load(out)
    assert [o.name for o in bundle.outputs] == names
    full = session(bundle.full)
    reference = dict(zip([o.name for o in full.get_outputs()], full.run(None, feeds)))
    assert sorted(reference) == sorted(names)
    splits = {cid: _split_outputs(bundle, cid, feeds) for cid in bundle.cut_ids}
    model = onnx.load(str(bundle.full))
    middle = [c for c in bundle.document.candidates if c.id not in (EDGE_ONLY, CLOUD_ONLY)]
    assert len(middle) >= 3
    for c in middle[:: max(1, len(middle) // 4)]:
        head, tail = extract_split(model, list(c.cut), tmp / f"{c.id}.h.onnx", tmp / f"{c.id}.t.onnx")
        splits[c.id] = _run_parts([head, tail], feeds, names)
    for cut_id, got in splits.items():
        for name in names:
            np.testing.assert_allclose(got[name], reference[name], rtol=1e-4, atol=atol, err_msg=f"{cut_id} {name}")
    return bundle


@pytest.mark.parametrize("fmt", ["traced", "scripted", "pt2", "onnx"])
def test_dict_output_segmenter_splits_from_every_format(fmt, tmp_path):
    path = _save_segmenter(fmt, tmp_path / "seg_model")
    out = tmp_path / "bundle"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = profile(path, device="rpi4", cloud="t4", network="4g", out=out,
                         input_shape=SEGMENTER_SHAPE if fmt == "scripted" else None)  # scripted: no shapes recorded
    assert [o.name for o in result.plan_document.model.outputs] == ["out", "aux"]
    x = np.random.default_rng(3).standard_normal((2, *SEGMENTER_SHAPE[1:])).astype(np.float32)
    bundle = _check_bundle(out, {"input": x}, ["out", "aux"], tmp_path)
    reference = build_segmenter()(torch.from_numpy(x))
    full = dict(zip(["out", "aux"], session(bundle.full).run(None, {"input": x})))
    for name in ("out", "aux"):
        np.testing.assert_allclose(full[name], reference[name].detach().numpy(), rtol=1e-4, atol=1e-4)
    if fmt in ("traced", "scripted"):  # model.pt in seg_model/: the folder names it, with the file's hash
        assert bundle.model_name.startswith("seg_model-") and len(bundle.model_name) == len("seg_model-") + 8


def _save_text_model(fmt: str, d: Path, *, dict_output: bool = True) -> Path:
    model = build_text_model(dict_output=dict_output)
    ids, mask = text_inputs()
    d.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "traced":
            torch.jit.trace(model, (ids, mask), strict=False).save(str(d / "bert.pt"))
            return d / "bert.pt"
        if fmt == "scripted":  # records no shapes or dtypes: --input-shape must say them
            torch.jit.script(build_text_model(dict_output=False)).save(str(d / "bert.pt"))
            return d / "bert.pt"
        torch.export.save(torch.export.export(model, (ids, mask)), str(d / "bert.pt2"))
        return d / "bert.pt2"


@pytest.mark.parametrize("fmt", ["traced", "pt2"])
def test_text_model_with_int64_inputs_splits(fmt, tmp_path):
    path = _save_text_model(fmt, tmp_path / "text")
    out = tmp_path / "bundle"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = profile(path, device="rpi4", cloud="t4", network="4g", out=out, name="tiny-bert")
    model = result.plan_document.model
    assert [(s.name, s.dtype) for s in model.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]
    assert [o.name for o in model.outputs] == ["logits", "last_hidden_state"]
    ids, mask = text_inputs(batch=2 if fmt == "traced" else 1, seed=5)  # this .pt2 records batch 1 (exported so)
    bundle = _check_bundle(out, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                           ["logits", "last_hidden_state"], tmp_path)
    assert bundle.model_name == "tiny-bert"
    int8 = bundle.cut(EDGE_ONLY).head_int8
    assert int8 is not None
    _assert_integers_not_quantized(onnx.load(str(int8)))
    reference = build_text_model()(ids, mask)["logits"].detach().numpy()
    got = session(bundle.full).run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


def _assert_integers_not_quantized(model: onnx.ModelProto) -> None:
    """The int8 head takes its int64 inputs as they are, and no QuantizeLinear reads an integer tensor."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
    assert [types[i.name] for i in model.graph.input] == [onnx.TensorProto.INT64] * 2
    quantized = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantized, "the head is quantized"
    assert all(types.get(t, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for t in quantized)


def test_scripted_text_model_takes_names_and_dtypes_from_input_shape(tmp_path):
    path = _save_text_model("scripted", tmp_path / "text")
    with pytest.raises(ModelLoadError, match=r"input_ids=SHAPE\[:DTYPE\],attention_mask=SHAPE\[:DTYPE\]"):
        load_model(path, tmp_path / "w0")
    hints = parse_input_hints("input_ids=1x16:int64,attention_mask=1x16:int64")
    loaded = load_model(path, tmp_path / "w1", input_hints=hints)
    assert [(s.name, s.shape, s.dtype) for s in loaded.inputs] == [("input_ids", (None, 16), "int64"),
                                                                   ("attention_mask", (None, 16), "int64")]
    assert [o.name for o in loaded.outputs] == ["output"]
    with pytest.raises(ModelLoadError, match="'tokens'.*model's inputs are 'input_ids', 'attention_mask'"):
        load_model(path, tmp_path / "w2", input_hints=parse_input_hints("tokens=1x16:int64"))


def test_recorded_dtype_wins_over_a_conflicting_hint(tmp_path):
    path = _save_text_model("traced", tmp_path / "text")
    with pytest.raises(ModelLoadError, match="'input_ids' is int64 in the model, not float32"):
        load_model(path, tmp_path / "w", input_hints=parse_input_hints("input_ids=1x16:float32"))


def test_token_ids_stay_below_the_vocabulary(tmp_path):
    path = _save_text_model("traced", tmp_path / "text")
    loaded = load_model(path, tmp_path / "w")
    highs = integer_input_highs(onnx.load(str(loaded.onnx_path)), default=1000)
    assert highs == {"input_ids": 100, "attention_mask": 2}
    samples = synthetic_samples(loaded.inputs, 50, seed=0, int_high=highs)
    ids = np.concatenate([s["input_ids"] for s in samples])
    assert ids.dtype == np.int64 and ids.max() < 100 and ids.max() >= 50  # spread over the vocabulary
    assert set(np.unique(np.concatenate([s["attention_mask"] for s in samples]))) <= {0, 1}


def test_input_shape_parsing():
    assert parse_input_hints("1x3x8x8") == (InputHint(None, (1, 3, 8, 8), None),)
    assert parse_input_hints("1x128:int64") == (InputHint(None, (1, 128), "int64"),)
    assert parse_input_hints("a=1x4:int64,b=1x4") == (InputHint("a", (1, 4), "int64"), InputHint("b", (1, 4)))
    for bad in ("a=1x4,a=1x4", "a=1x4:complex", "=1x4", "a=1xq"):
        with pytest.raises(ModelLoadError, match="--input-shape"):
            parse_input_hints(bad)
    args = build_parser().parse_args(["m.pt", "--input-shape", "ids=1x8:int64", "--int-high", "500", "--name", "b1"])
    opts = options_from_args(args)
    assert opts.input_hints == (InputHint("ids", (1, 8), "int64"),) and opts.input_shape is None
    assert opts.int_high == 500 and opts.name == "b1"
    assert options_from_args(build_parser().parse_args(["m.pt", "--input-shape", "1x3x8x8"])).input_shape == (
        1, 3, 8, 8)


def test_default_names(tmp_path):
    sha = "0123456789abcdef" * 4
    assert default_model_name(tmp_path / "resnet50.pt", sha) == "resnet50"
    assert default_model_name(tmp_path / "yolo" / "model.pt", sha) == "yolo-01234567"
    assert default_model_name(tmp_path / "weights" / "model.onnx", sha) == "model-01234567"
    with pytest.raises(ValueError, match="'name'"):
        profile("tiny_cnn", name="bad name!")


def test_pickled_module_inputs_take_the_names_given_in_forward_order(tmp_path):
    path = tmp_path / "bert_pickled.pt"
    torch.save(build_text_model(dict_output=False), str(path))
    hints = parse_input_hints("input_ids=1x8:int64,attention_mask=1x8:int64")
    loaded = load_model(path, tmp_path / "w", allow_pickle=True, input_hints=hints)
    assert [(s.name, s.shape, s.dtype) for s in loaded.inputs] == [("input_ids", (None, 8), "int64"),
                                                                   ("attention_mask", (None, 8), "int64")]
