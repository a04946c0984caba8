"""The edge agent with a LiteRT head against a real cloud on loopback: split results, then the cloud gone.

The bundle is the tiny one with its .tflite heads added by `add_tflite_heads` (the hand-built Conv+Relu head of
tests/litert_tiny.py stands in for onnx2tf, so this runs without the converter environment). The agent's head runs
on LiteRT (config `runtime = "litert"`); its local tail, when the cloud is gone, on onnxruntime.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("ai_edge_litert", reason="the [litert] extra (ai-edge-litert) is part of [dev]")

from cloud_tier.server import CloudServer  # noqa: E402
from edge_agent import CLOUD, EDGE, LOCAL, EdgeAgent  # noqa: E402
from edge_agent.config import AgentConfig  # noqa: E402
from edge_agent.constants import DEFAULT_DEVICE_ID  # noqa: E402
from edge_agent.runtime_litert import LiteRTRunner  # noqa: E402
from models.manifest import Bundle  # noqa: E402
from models.tiny_bundle import MID_CUT, make_tiny_bundle, sample_input  # noqa: E402
from partitioning.tflite import add_tflite_heads  # noqa: E402
from tests.litert_tiny import make_converter  # noqa: E402
from tests.pki import device_tls  # noqa: E402

pytestmark = pytest.mark.skipif(
    "runtime" not in {f.name for f in dataclasses.fields(AgentConfig)},
    reason="the agent's runtime selection (AgentConfig.runtime, edge_agent/runtime.py open_runner) is not here yet",
)

# The int8 .tflite head (int8 input, weights and output) then the int8 activation codec, through the tail: of the
# same order as the ONNX int8 head's error in test_agent_split.py (SPLIT_ATOL 0.03 there, worst seen 0.0062).
LITERT_ATOL = 0.05


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("litert_bundles")
    add_tflite_heads(make_tiny_bundle(root / "tiny"), make_converter())
    return root


@pytest.fixture(scope="module")
def full_model(bundles_dir):
    sess = ort.InferenceSession(str(Bundle.load(bundles_dir / "tiny").full))
    return lambda x: sess.run(None, {"input": x})[0]


def _agent(bundles_dir: Path, address: str, **fields) -> EdgeAgent:
    fields.setdefault("connect_timeout_s", 0.5)
    fields.setdefault("backoff", {"initial_s": 0.05, "max_s": 0.3})
    fields.setdefault("probe_count", 2)
    fields.setdefault("tls", device_tls(DEFAULT_DEVICE_ID))
    return EdgeAgent.from_bundle(bundles_dir / "tiny", address, runtime="litert", **fields)


def test_a_litert_head_serves_through_the_cloud_and_falls_back_to_the_device(bundles_dir, full_model):
    server = CloudServer(bundles_dir, "127.0.0.1", 0, max_wait_ms=5.0)
    port = server.start()
    agent = _agent(bundles_dir, f"127.0.0.1:{port}")
    try:
        rt = agent._runtime(MID_CUT)
        assert isinstance(rt.head, LiteRTRunner) and rt.head.path.name == "head.int8.tflite"
        assert not isinstance(rt.tail, LiteRTRunner)  # the local tail stays on onnxruntime
        xs = [sample_input(seed=s) for s in range(8)]
        results = [f.result(timeout=10) for f in [agent.submit(x) for x in xs]]
        assert [r.served_by for r in results] == [CLOUD] * len(xs), [r.fallback_reason for r in results]
        for x, r in zip(xs, results, strict=True):
            assert r.cut == MID_CUT
            np.testing.assert_allclose(r.output, full_model(x), atol=LITERT_ATOL)
        server.stop(grace=1.0)
        assert agent.wait_for_mode(LOCAL, 5)
        x = sample_input(seed=99)
        r = agent.infer(x, timeout=5)
        assert r.served_by == EDGE and r.cut == MID_CUT
        np.testing.assert_allclose(r.output, full_model(x), atol=LITERT_ATOL)
    finally:
        agent.close()
        server.stop(grace=0.5)
