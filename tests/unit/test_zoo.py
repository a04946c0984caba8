"""The built-in zoo: entries, deterministic weights, and ONNX conversion that matches torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from models.convert import BATCH_DIM, to_onnx  # noqa: E402
from models.zoo import build_zoo_model, zoo_entry, zoo_names  # noqa: E402

REQUIRED = ("tiny_cnn", "mobilenet_v2", "resnet18", "vgg11", "vit_tiny", "unet_small")
SLOW = {"mobilenet_v2", "resnet18", "unet_small"}  # build + export take more than ~5 s here


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def test_zoo_lists_the_required_models_with_sane_entries():
    assert set(REQUIRED) <= set(zoo_names())
    for name in zoo_names():
        entry = zoo_entry(name)
        assert entry.name == name
        assert entry.input_shape[0] == 1 and all(d > 0 for d in entry.input_shape)
        assert entry.task in ("classification", "segmentation", "detection")
        assert entry.description
    assert zoo_entry("unet_small").task == "segmentation"
    assert zoo_entry("tiny_cnn").input_shape == (1, 3, 32, 32)


def test_unknown_zoo_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="resnet18.*tiny_cnn|tiny_cnn.*resnet18"):
        zoo_entry("resnet19")
    with pytest.raises(KeyError, match="no zoo model 'nope'"):
        build_zoo_model("nope")


@pytest.mark.parametrize("name", _params(REQUIRED))
def test_build_is_deterministic_and_in_eval_mode(name):
    a, b = build_zoo_model(name), build_zoo_model(name)
    assert not a.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{name}: {key} differs between two builds"


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_zoo_model("tiny_cnn")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", _params(REQUIRED))
def test_forward_gives_the_task_shaped_sane_output(name):
    entry = zoo_entry(name)
    x = torch.randn(entry.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = build_zoo_model(name)(x)
    assert torch.isfinite(y).all()
    assert 1e-3 < float(y.std()) < 100, "BatchNorm calibration should keep activations at a sane scale"
    if entry.task == "classification":
        assert y.dim() == 2 and y.shape[0] == 1
    else:
        assert y.shape[0] == 1 and y.shape[2:] == x.shape[2:], "segmentation output is a per-pixel map"


@pytest.mark.parametrize("name", _params(REQUIRED))
def test_onnx_conversion_matches_torch_at_batch_2(name, zoo_onnx):
    path = zoo_onnx(name)
    entry = zoo_entry(name)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not list(path.parent.glob(f"{path.name}.data"))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == BATCH_DIM
    assert len(model.graph.value_info) > 0
    assert any(o.domain == "" and o.version >= 17 for o in model.opset_import)

    x = torch.randn((2, *entry.input_shape[1:]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = build_zoo_model(name)(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_tiny_cnn_onnx_bytes_are_reproducible(tmp_path: Path, zoo_onnx):
    """The zoo's sha256 identifies a model: a second export (other example values) gives the same bytes."""
    x = torch.randn(zoo_entry("tiny_cnn").input_shape, generator=torch.Generator().manual_seed(3))
    again = to_onnx(build_zoo_model("tiny_cnn"), (x,), tmp_path / "again.onnx")
    assert again.read_bytes() == zoo_onnx("tiny_cnn").read_bytes()
