"""TorchScript the legacy ONNX exporter refuses as saved (transformers traced on torch's own layers, attention
fast paths traced under no_grad) converts after freezing and rewriting; what still fails says so in one line;
.pt2 archives whose output types are not registered name the package; each export step reports its time."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

from models.loaders import ModelLoadError, load_model
from models.testnets import VIT_SHAPE, build_vit
from partitioning.cli import main as split_profile
from partitioning.extract import session


def _trace(model: torch.nn.Module, x: torch.Tensor, path: Path, *, no_grad: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.set_grad_enabled(not no_grad):
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (x,), check_trace=False).save(str(path))
    return path


@pytest.mark.parametrize("encoder, no_grad", [
    ("torch", False),  # legacy: "ONNX export of transpose for tensor of unknown rank" (unflatten)
    ("torch", True),  # the fast path: aten::_transformer_encoder_layer_fwd
    ("mha", True),  # vit_b_16's fast path: aten::_native_multi_head_attention
])
def test_traced_transformer_converts_and_keeps_a_dynamic_batch(encoder, no_grad, tmp_path):
    model = build_vit(encoder=encoder)
    x = torch.randn(VIT_SHAPE, generator=torch.Generator().manual_seed(0))
    path = _trace(model, x, tmp_path / "vit" / "model.pt", no_grad=no_grad)
    said: list[str] = []
    loaded = load_model(path, tmp_path / "work", progress=said.append)
    assert loaded.inputs[0].shape[0] is None  # batch stays dynamic
    batch = torch.randn((3, *VIT_SHAPE[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(batch).numpy()
    got = session(loaded.onnx_path).run(None, {"input": batch.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert any(line.startswith("exporting model.pt to ONNX (legacy TorchScript exporter)... ") and
               line.endswith(" s") for line in said), said
    assert any(line.startswith("loading model.pt (TorchScript)... ") for line in said)


class _DictOut(torch.nn.Module):
    """The ViT behind a dict output, as Hugging Face models return them."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(x)
        return {"logits": logits, "probs": torch.softmax(logits, -1)}


def test_a_traced_transformer_with_a_dict_output_converts_on_its_fast_path(tmp_path):
    """The output-flattening wrapper was left in training mode, so freezing (which the fast-path rewrite needs)
    failed and the export stopped on aten::_transformer_encoder_layer_fwd (found by a new-user trial)."""
    model = _DictOut(build_vit(encoder="torch")).eval()
    x = torch.randn(VIT_SHAPE, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = tmp_path / "vitd" / "model.pt"
        path.parent.mkdir(parents=True)
        torch.jit.trace(model, (x,), check_trace=False, strict=False).save(str(path))
    loaded = load_model(path, tmp_path / "work")
    assert [o.name for o in loaded.outputs] == ["logits", "probs"]
    with torch.no_grad():
        want = model(x)
    got = session(loaded.onnx_path).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got[0], want["logits"].numpy(), rtol=1e-4, atol=1e-5)


class _Svd(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x)


def test_an_operator_without_onnx_form_is_one_line_naming_it_and_what_to_hand_over(tmp_path, capsys):
    path = _trace(_Svd(), torch.randn(1, 4, 4), tmp_path / "svd.pt", no_grad=False)
    with pytest.raises(ModelLoadError) as err:
        load_model(path, tmp_path / "work")
    text = str(err.value)
    assert "\n" not in text and len(text) < 500
    assert "aten::linalg_svd" in text and ".pt2" in text and "ONNX" in text
    code = split_profile([str(path), "--device", "rpi4", "--cloud", "t4", "-q"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "aten::linalg_svd" in lines[0] and "--debug" in lines[0]
    with pytest.raises(ModelLoadError) as debug:  # --debug: the traceback, down to the exporter's own error
        split_profile([str(path), "--device", "rpi4", "--cloud", "t4", "-q", "--debug"])
    causes = []
    cause: BaseException | None = debug.value
    while cause is not None:
        causes.append(type(cause).__name__)
        cause = cause.__cause__
    assert "UnsupportedOperatorError" in causes


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor


class _Returns(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> _Output:
        return _Output(x * 2)


def test_a_pt2_with_unregistered_output_types_names_the_package(tmp_path, capfd):
    pytree.register_dataclass(_Output, serialized_type_name="missingpkg.modeling_outputs.Output")
    try:
        program = torch.export.export(_Returns(), (torch.randn(1, 3),))
        torch.export.save(program, str(tmp_path / "hf.pt2"))
    finally:
        pytree._deregister_pytree_node(_Output)
    capfd.readouterr()
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "hf.pt2", tmp_path / "work")
    assert "this .pt2 needs the package that defined its output types: import missingpkg" in str(err.value)
    assert "missingpkg.modeling_outputs.Output" in str(err.value)
    assert "Traceback" not in capfd.readouterr().err  # torch's logged traceback stays off stderr
