"""Head then tail equals the full model: every zoo model and DAGs built here, at many cuts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from models.convert import to_onnx
from models.inputs import synthetic_samples
from models.manifest import TensorSpec
from partitioning.extract import extract_split, session, verify_split
from partitioning.graph import build_cut_graph
from partitioning.planner import CostInputs, Link, search_edge_sets


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(y + self.b(torch.relu(self.a(y))))
        return self.fc(y.mean((2, 3)))


class MultiBranch(nn.Module):
    """Inception-like: three branches of different depth concatenated."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(3, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(3, 4, 1))
        self.out = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        return self.out(torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)).mean((2, 3))


class SkipUNet(nn.Module):
    """Encoder-decoder whose skips cross every middle cut: cuts there carry several tensors."""

    def __init__(self):
        super().__init__()
        self.e1 = nn.Conv2d(3, 8, 3, padding=1)
        self.e2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.d1 = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        s1 = torch.relu(self.e1(x))
        s2 = torch.relu(self.e2(s1))
        u = self.up(torch.relu(self.mid(s2)) + s2)
        return self.d1(torch.cat([u, s1], 1))


def _cut_sets(graph, limit):
    """Baselines excluded: a spread of prefix cuts plus the min-cut solutions over several links."""
    costs = CostInputs(edge_ms={v: 1.0 for v in graph.nodes}, cloud_ms={v: 0.1 for v in graph.nodes})
    links = [Link(m, 50, 10) for m in (1, 10, 100)]
    sets = [s for s in search_edge_sets(graph, costs, links) if 0 < len(s) < len(graph.nodes)]
    step = max(1, len(sets) // limit)
    return sets[::step][:limit]


def _check_model(path, tmp_path, limit):
    model = onnx.load(str(path))
    graph = build_cut_graph(model)
    inputs = [TensorSpec(i, (None, *graph.tensors[i].shape[1:]), graph.tensors[i].dtype) for i in graph.inputs]
    samples = synthetic_samples(inputs, 2, seed=3)
    full = session(path)
    multi = 0
    checked = 0
    for i, edge in enumerate(_cut_sets(graph, limit)):
        cut = graph.cut_tensors(edge)
        multi += len(cut) > 1
        head, tail = extract_split(model, cut, tmp_path / f"h{i}.onnx", tmp_path / f"t{i}.onnx")
        assert [o.name for o in session(head).get_outputs()] == list(cut)
        assert sorted(x.name for x in session(tail).get_inputs()) == sorted(cut)
        check = verify_split(full, session(head), session(tail), samples)
        assert check.passed, f"cut {cut}: max error {check.max_abs_error} > {check.tolerance}"
        checked += 1
    assert checked > 0
    return multi


@pytest.mark.parametrize("module", [Residual, MultiBranch, SkipUNet])
def test_dag_models_round_trip_at_every_cut(module, tmp_path):
    torch.manual_seed(0)
    path = to_onnx(module().eval(), (torch.randn(1, 3, 16, 16),), tmp_path / "m.onnx")
    multi = _check_model(path, tmp_path, limit=40)
    assert multi > 0, "a DAG model must offer cuts that carry several tensors"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_cnn", "mobilenet_v2", "resnet18", "vgg11", "vit_tiny", "unet_small"])
def test_zoo_models_round_trip(name, zoo_onnx, tmp_path):
    _check_model(zoo_onnx(name), tmp_path, limit=6)


def test_split_check_detects_a_wrong_tail(tmp_path):
    torch.manual_seed(0)
    path = to_onnx(Residual().eval(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    graph = build_cut_graph(model)
    edge = frozenset(graph.nodes[:2])
    cut = graph.cut_tensors(edge)
    head, tail = extract_split(model, cut, tmp_path / "h.onnx", tmp_path / "t.onnx")
    other = to_onnx(Residual().eval(), (torch.randn(1, 3, 8, 8),), tmp_path / "other.onnx")  # other weights
    samples = [{"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}]
    assert not verify_split(session(other), session(head), session(tail), samples).passed
