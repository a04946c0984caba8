"""A BERT-style text model (two int64 inputs, a ModelOutput-like dict out) saved as TorchScript: profiled, cut,
its int8 head made, and run by an edge agent against a real cloud server on loopback (mTLS with the session CA);
the outputs come back under their names and equal the full model's."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cloud_tier.server import CloudServer
from edge_agent import CLOUD, EdgeAgent
from edge_agent.constants import DEFAULT_DEVICE_ID
from models.convert import integer_input_highs
from models.inputs import synthetic_samples
from models.loaders import load_model
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle
from models.testnets import build_text_model, text_inputs
from partitioning import profile
from partitioning.bundle import write_bundle
from partitioning.graph import build_cut_graph
from tests.pki import device_tls

NAMES = ["logits", "last_hidden_state"]


@pytest.fixture(scope="module")
def text_bundles(tmp_path_factory) -> tuple[Path, str]:
    """The text model's bundle, with a middle cut that carries integer tensors as well as floats."""
    root = tmp_path_factory.mktemp("text")
    src = root / "src" / "model.pt"
    src.parent.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(build_text_model(), text_inputs(), strict=False).save(str(src))
        result = profile(src, device="rpi4", cloud="t4", network="4g", name="tiny-bert")
        loaded = load_model(src, root / "work", name="tiny-bert")
    proto = onnx.load(str(loaded.onnx_path))
    graph = build_cut_graph(proto)
    ints = {n for n, t in graph.tensors.items() if np.dtype(t.dtype).kind == "i"}
    # batched tensors only: a shape tensor the tracer left in the graph has no batch dimension to stack requests on
    batched = {n for n, t in graph.tensors.items() if len(t.shape) >= 2}
    middle = [c for c in result.plan.candidates if c.id not in (EDGE_ONLY, CLOUD_ONLY)
              and set(c.cut) <= batched and set(c.cut) & ints and set(c.cut) - ints]
    assert middle, "a cut carrying integer and float tensors"
    cut = middle[len(middle) // 2].id
    plan = dataclasses.replace(result.plan, plan_table=((1000.0, cut),))  # the bundle carries this middle cut
    highs = integer_input_highs(proto)
    calib = synthetic_samples(loaded.inputs, 16, seed=1, int_high=highs)
    checks = synthetic_samples(loaded.inputs, 16, seed=2, int_high=highs)
    write_bundle(root / "bundles" / "bert", proto, loaded.onnx_path, graph, plan, result.plan_document, calib, checks,
                 loaded.task)
    return root / "bundles", cut


@pytest.fixture(scope="module")
def server(text_bundles):
    srv = CloudServer(text_bundles[0], "127.0.0.1", 0, max_wait_ms=5.0)
    srv.start()
    yield srv
    srv.stop(grace=1.0)


@pytest.mark.parametrize("fields, rtol", [({"head_precision": "fp32", "codec": "fp32"}, 1e-4), ({}, 0.1)])
def test_text_model_split_between_agent_and_cloud(text_bundles, server, fields, rtol):
    bundles, cut = text_bundles
    bundle = Bundle.load(bundles / "bert")
    assert bundle.model_name == "tiny-bert" and cut in bundle.cut_ids
    assert [(s.name, s.dtype) for s in bundle.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]
    full = ort.InferenceSession(str(bundle.full), providers=["CPUExecutionProvider"])
    tls = device_tls(DEFAULT_DEVICE_ID)
    with EdgeAgent.from_bundle(bundles / "bert", server.address, cut=cut, connect_timeout_s=2.0, tls=tls,
                               **fields) as agent:
        for seed in range(4):
            ids, mask = (t.numpy() for t in text_inputs(batch=1, seed=seed))
            result = agent.infer({"input_ids": ids, "attention_mask": mask}, timeout=30)
            assert result.served_by == CLOUD and result.cut == cut, result.fallback_reason
            assert list(result.outputs) == NAMES
            want = dict(zip(NAMES, full.run(NAMES, {"input_ids": ids, "attention_mask": mask})))
            for name in NAMES:
                scale = float(np.max(np.abs(want[name])))
                np.testing.assert_allclose(result.outputs[name], want[name], rtol=0, atol=rtol * scale, err_msg=name)
