"""The same model handed over as TorchScript (traced model.pt), torch.export (.pt2) or ONNX gives the same
graph to plan: every node's shapes known (no convolution costed at zero), the same work within a few percent,
about the same number of nodes to search, no shape value offered as a cut; a .pt2 exported at batch 1 runs
head then tail at batch 4; onnxruntime's own error lines stay off stderr."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from models.loaders import load_model
from models.testnets import DETECTOR_SHAPE, VIT_SHAPE, build_detector, build_vit
from partitioning import profile
from partitioning.extract import extract_split, run_split, session
from partitioning.flops import node_stats
from partitioning.graph import build_cut_graph

FORMATS = ("model.pt", "model.pt2", "model.onnx")


def _save(model: torch.nn.Module, shape: tuple[int, ...], d: Path) -> Path:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    d.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (x,), check_trace=False).save(str(d / "model.pt"))
        torch.export.save(torch.export.export(model, (x,)), str(d / "model.pt2"))
        torch.onnx.export(model, (x,), str(d / "model.onnx"), dynamo=False, opset_version=18)  # batch fixed at 1
    return d


@pytest.fixture(scope="module")
def detector_files(tmp_path_factory):
    return _save(build_detector(), DETECTOR_SHAPE, tmp_path_factory.mktemp("detector"))


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    return _save(build_vit(), VIT_SHAPE, tmp_path_factory.mktemp("vit"))


_LOADED: dict[Path, Any] = {}  # each file converted once for the whole module (a .pt2 export takes seconds)


def _load(path: Path, work: Path) -> Any:
    if path not in _LOADED:
        _LOADED[path] = load_model(path, work)
    return _LOADED[path]


def _analyse(path: Path, work: Path) -> tuple[int, float, list[str], Any]:
    loaded = _load(path, work)
    proto = onnx.load(str(loaded.onnx_path))
    stats = node_stats(proto)
    graph = build_cut_graph(proto)
    blind = [s.name for s in stats.values() if not s.shapes_known]
    zero_convs = [s.name for s in stats.values() if s.op_type == "Conv" and s.flops == 0]
    assert not zero_convs, f"{path.name}: convolutions costed at zero: {zero_convs}"
    return len(graph.nodes), sum(s.flops for s in stats.values()), blind, graph


def test_a_pt2_at_batch_one_splits_and_runs_batch_four(detector_files, tmp_path, capfd):
    capfd.readouterr()
    loaded = _load(detector_files / "model.pt2", tmp_path / "work")  # first here: stderr is watched
    assert loaded.inputs[0].shape[0] is None  # the Reshapes to batch 1 torch.export baked in now keep the batch
    assert "onnxruntime" not in capfd.readouterr().err  # the batch-2 probes' failures stay off stderr
    proto = onnx.load(str(loaded.onnx_path))
    graph = build_cut_graph(proto)
    middle = frozenset(graph.nodes[: len(graph.nodes) // 2])
    head, tail = extract_split(proto, graph.cut_tensors(middle), tmp_path / "head.onnx", tmp_path / "tail.onnx")
    x = torch.randn((4, *DETECTOR_SHAPE[1:]), generator=torch.Generator().manual_seed(2))
    got = run_split(session(head), session(tail), {"input": x.numpy()})[0]
    with torch.no_grad():
        want = build_detector()(x).numpy()
    assert got.shape[0] == 4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which, node_slack", [("detector", 0.06), ("vit", 0.15)])
def test_every_format_gives_the_same_work_and_about_the_same_graph(which, node_slack, detector_files, vit_files,
                                                                  tmp_path):
    d = detector_files if which == "detector" else vit_files
    found = {f: _analyse(d / f, tmp_path / f.replace(".", "_")) for f in FORMATS}
    nodes, flops = found["model.pt2"][0], found["model.pt2"][1]
    for f, (n, work, blind, _) in found.items():
        assert not blind, f"{f}: nodes whose shapes are unknown: {blind[:5]}"
        assert abs(work - flops) <= 0.03 * flops, f"{f}: {work / 1e6:.3f} MFLOPs against {flops / 1e6:.3f} (.pt2)"
        assert abs(n - nodes) <= node_slack * nodes, f"{f}: {n} nodes to search against {nodes} (.pt2)"


def test_no_cut_carries_a_shape_value(vit_files, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = profile(vit_files / "model.pt", device="rpi4", cloud="t4", network="4g")
    proto_graph = _analyse(vit_files / "model.pt", tmp_path / "w")[3]
    assert proto_graph.local_tensors  # the traced class-token Expand keeps a batch-dependent shape value
    for cand in result.plan_document.candidates:
        assert not set(cand.cut) & proto_graph.local_tensors, cand.id
    # without the rule some prefix would carry one: the shape value is made early and read late
    positions = [proto_graph.position(proto_graph.tensors[t].producer) for t in proto_graph.local_tensors]
    readers = [proto_graph.position(c) for t in proto_graph.local_tensors for c in proto_graph.tensors[t].consumers]
    assert min(positions) < max(readers) - 1



class _TimmStyleViT(torch.nn.Module):
    """A class token and attention as timm writes it: qkv reshaped batch first, F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.heads = heads
        self.patch = torch.nn.Conv2d(3, dim, 8, stride=8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.head(x[:, 0])


def test_a_vit_pt2_at_batch_one_runs_batch_three(tmp_path):
    """torch.export at batch 1 folds the class token's expand into a weight of batch 1 and bakes 1 into the
    attention's Reshapes of (batch * heads) rows: both made to follow the batch (timm's ViT as .pt2)."""
    model = _TimmStyleViT().eval()
    x = torch.randn(VIT_SHAPE, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "model.pt2"))
    loaded = load_model(tmp_path / "model.pt2", tmp_path / "work")
    assert loaded.inputs[0].shape[0] is None
    x3 = torch.randn((3, *VIT_SHAPE[1:]), generator=torch.Generator().manual_seed(1))
    got = session(loaded.onnx_path).run(None, {"input": x3.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x3).numpy(), rtol=1e-4, atol=1e-4)


class _UpsampleToInput(torch.nn.Module):
    """A segmentation head upsampled to the input's size, as torchvision's: interpolate(size=x.shape[-2:])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.down = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.head = torch.nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.relu(self.down(x)))
        return torch.nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_a_traced_upsample_to_the_input_size_is_folded_and_cuts_stay_open(tmp_path):
    """The legacy exporter computes the Resize sizes [batch, C, H, W] from the input's shape: a shape value made
    at the input and read at the end, so no cut could be offered in between (lraspp as model.pt: 16 cuts of 168).
    Folded to the spatial sizes, the graph is the .pt2's and keeps its batch."""
    model = _UpsampleToInput().eval()
    d = _save(model, (1, 3, 32, 32), tmp_path / "files")
    pt = build_cut_graph(onnx.load(str(_load(d / "model.pt", tmp_path / "pt").onnx_path)))
    pt2 = build_cut_graph(onnx.load(str(_load(d / "model.pt2", tmp_path / "pt2").onnx_path)))
    assert not pt.local_tensors
    assert len(pt.nodes) == len(pt2.nodes)
    loaded = _load(d / "model.pt", tmp_path / "pt")
    x3 = torch.randn((3, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x3).numpy()
    np.testing.assert_allclose(session(loaded.onnx_path).run(None, {"input": x3.numpy()})[0], want, rtol=1e-4,
                               atol=1e-5)


class _MaskFromShape(torch.nn.Module):
    """A mask built from the input's shape by slice assignment, as swin's shifted windows build theirs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mask = torch.zeros((h, w), dtype=x.dtype)
        mask[: h // 2, :] = 1.0
        mask[:, w // 3:] = -1.0
        return torch.relu(x) + mask


def test_a_large_constant_built_from_shapes_is_folded(tmp_path):
    """80 x 80 mask values, the same at any batch: above the few integers of a shape value, folded all the same
    (swin_t as model.pt: 2,511 nodes to search and 1,605 shape values closing cuts, against 581 and none)."""
    d = _save(_MaskFromShape(), (1, 2, 80, 80), tmp_path / "files")
    loaded = _load(d / "model.pt", tmp_path / "pt")
    proto = onnx.load(str(loaded.onnx_path))
    graph = build_cut_graph(proto)
    assert not graph.local_tensors
    assert [n.op_type for n in proto.graph.node] == ["Relu", "Add"]
    assert loaded.inputs[0].shape[0] is None


class _MaskedAttention(torch.nn.Module):
    """Scores masked with -inf where the mask is 0, as Hugging Face's BERT attention (the legacy exporter writes
    the -inf as a Constant node)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = (x @ x.transpose(-1, -2)).masked_fill(mask[:, None, :] == 0, float("-inf"))
        return torch.softmax(scores, dim=-1) @ x


def test_constants_are_weights_not_tensors_to_cut_or_measure(tmp_path):
    """bert_hf as model.pt: the codec measurement met the -inf Constant among the activations and split-profile
    stopped ("cannot int8-quantize non-finite values"); as .pt2 or ONNX constants are initializers."""
    from partitioning.codecs import measure_codecs
    from partitioning.graph import activations

    x = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_MaskedAttention(), (x, mask)).save(str(tmp_path / "model.pt"))
    from models.loaders import parse_input_hints

    loaded = load_model(tmp_path / "model.pt", tmp_path / "w", input_hints=parse_input_hints("x=1x6x4,mask=1x6:int64"))
    proto = onnx.load(str(loaded.onnx_path))
    assert "Constant" not in {n.op_type for n in proto.graph.node}
    graph = build_cut_graph(proto)
    feeds = {"x": x.numpy(), "mask": np.ones((1, 6), np.int64)}  # as the synthetic samples: attend everywhere
    arrays = activations(proto, list(graph.tensors), feeds=feeds)
    measure_codecs({k: v for k, v in arrays.items() if k in graph.tensors}, ("int8",))
