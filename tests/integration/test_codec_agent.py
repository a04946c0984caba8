"""The agent sends each cut with the plan's codec (config codec "auto") through a real cloud tier on loopback:
a split cut, cloud-only with the input compressed, the codec switched with the cut, and the config's override."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloud_tier.server import CloudServer
from edge_agent import CLOUD, EdgeAgent
from edge_agent.constants import DEFAULT_DEVICE_ID
from models.manifest import CLOUD_ONLY, EDGE_ONLY, PLAN_FILE, Bundle
from models.tiny_bundle import CUT_TENSOR, INPUT, MID_CUT, make_tiny_bundle, sample_input
from protos import codec
from tests.pki import device_tls

SPLIT_CODEC, CLOUD_CODEC, FAST_CLOUD_CODEC = "int8+zstd", "int8c+lz4", "fp16"
# Logits |y| <~ 1.3; int8c on the input (per channel, error <= range/510 per element) through the whole model,
# or the int8 head + int8 activation: measured worst cases ~0.01; a wrong codec or a garbled tensor gives ~1.
ATOL = 0.05


def with_codecs(root: Path) -> Path:
    """The tiny bundle with the codec fields split-profile writes: per candidate and per plan-table row."""
    path = root / PLAN_FILE
    plan = json.loads(path.read_text())
    codecs = {MID_CUT: SPLIT_CODEC, CLOUD_ONLY: CLOUD_CODEC, EDGE_ONLY: None}
    for cand in plan["candidates"]:
        cand["codec"] = codecs[cand["id"]]
    plan["plan_table"] = [{"uplink_mbps": 0.0, "cut": EDGE_ONLY}, {"uplink_mbps": 1.0, "cut": MID_CUT,
                                                                     "codec": SPLIT_CODEC},
                          {"uplink_mbps": 100.0, "cut": CLOUD_ONLY, "codec": FAST_CLOUD_CODEC}]
    path.write_text(json.dumps(plan, indent=2))
    return root


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codec_bundles")
    with_codecs(make_tiny_bundle(root / "tiny"))
    return root


@pytest.fixture(scope="module")
def server(bundles_dir):
    srv = CloudServer(bundles_dir, "127.0.0.1", 0, max_wait_ms=1.0)
    srv.start()
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def bundle(bundles_dir) -> Bundle:
    return Bundle.load(bundles_dir / "tiny")


def agent_for(bundles_dir: Path, address: str, **fields) -> EdgeAgent:
    fields.setdefault("connect_timeout_s", 2.0)
    fields.setdefault("backoff", {"initial_s": 0.05, "max_s": 0.3})
    fields.setdefault("probe_count", 1)
    fields.setdefault("tls", device_tls(DEFAULT_DEVICE_ID))
    return EdgeAgent.from_bundle(bundles_dir / "tiny", address, **fields)


def wire_size(name: str, arr: np.ndarray, spec: str) -> int:
    return codec.wire_bytes([codec.encode(name, arr, spec)])


def test_auto_sends_the_split_cut_with_the_plans_codec(bundles_dir, server, bundle):
    x = sample_input(seed=5)
    head = ort.InferenceSession(str(bundle.cut(MID_CUT).edge_head))
    activation = head.run(None, {INPUT: x})[0]
    with agent_for(bundles_dir, server.address) as agent:
        assert agent.codec == SPLIT_CODEC
        result = agent.infer(x, timeout=30)
    assert result.served_by == CLOUD and result.cut == MID_CUT, result.fallback_reason
    assert result.sent_bytes == wire_size(CUT_TENSOR, activation, SPLIT_CODEC)
    assert result.sent_bytes < wire_size(CUT_TENSOR, activation, "int8")  # zstd on the wire, not plain int8
    full = ort.InferenceSession(str(bundle.full)).run(None, {INPUT: x})[0]
    np.testing.assert_allclose(result.outputs["output"], full, atol=ATOL)


def test_cloud_only_with_the_input_compressed_is_served_end_to_end(bundles_dir, server, bundle):
    x = sample_input(seed=6)
    full = ort.InferenceSession(str(bundle.full)).run(None, {INPUT: x})[0]
    with agent_for(bundles_dir, server.address, cut=CLOUD_ONLY) as agent:
        assert agent.codec == CLOUD_CODEC
        compressed = agent.infer(x, timeout=30)
    assert compressed.served_by == CLOUD and compressed.cut == CLOUD_ONLY, compressed.fallback_reason
    assert compressed.sent_bytes == wire_size(INPUT, x, CLOUD_CODEC) < x.nbytes // 3
    np.testing.assert_allclose(compressed.outputs["output"], full, atol=ATOL)
    with agent_for(bundles_dir, server.address, cut=CLOUD_ONLY, codec="fp32") as agent:  # the raw baseline
        assert agent.codec == "fp32"
        raw = agent.infer(x, timeout=30)
    assert raw.served_by == CLOUD and raw.sent_bytes == x.nbytes
    np.testing.assert_allclose(raw.outputs["output"], full, atol=1e-4)


def test_switching_cuts_brings_the_rows_codec_and_an_explicit_codec_wins(bundles_dir, server):
    x = sample_input(seed=7)
    with agent_for(bundles_dir, server.address) as agent:
        agent.bandwidth.add(250_000, 10.0)  # one round trip: 200 Mbit/s, the plan table's cloud-only row
        agent.set_cut(CLOUD_ONLY)
        assert agent.codec == FAST_CLOUD_CODEC
        result = agent.infer(x, timeout=30)
        assert result.served_by == CLOUD and result.sent_bytes == wire_size(INPUT, x, FAST_CLOUD_CODEC)
        agent.set_cut(MID_CUT)
        assert agent.codec == SPLIT_CODEC
    with agent_for(bundles_dir, server.address, codec="int8") as agent:
        assert agent.codec == "int8"
        agent.set_cut(CLOUD_ONLY)
        assert agent.codec == "int8"
        result = agent.infer(x, timeout=30)
        assert result.served_by == CLOUD and result.sent_bytes == x.size  # one byte per element


def test_a_plan_without_codecs_sends_int8_as_before(tmp_path):
    root = make_tiny_bundle(tmp_path / "tiny")
    agent = EdgeAgent.from_bundle(root, "127.0.0.1:1", connect=False, insecure=True)
    try:
        assert agent.codec == "int8" and agent.codec_for(CLOUD_ONLY) == "int8"
    finally:
        agent.close()
