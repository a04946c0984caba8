"""split-profile chooses the codec with the cut, and the bundle it writes is served with those codecs: the agent
(codec auto) sends cloud-only with the input compressed as the plan says, through a real cloud tier."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort

from cloud_tier.server import CloudServer
from edge_agent import CLOUD, EdgeAgent
from edge_agent.constants import DEFAULT_DEVICE_ID
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle, PlanDocument
from models.tiny_bundle import INPUT, make_tiny_bundle, sample_input
from partitioning.api import profile
from protos import codec
from tests.pki import device_tls


def test_profile_writes_the_codec_pairs_and_the_bundle_serves_them(tmp_path):
    make_tiny_bundle(tmp_path / "src")
    result = profile(str(tmp_path / "src" / "full.onnx"), device="rpi4", network=None, uplink_mbps=0.5, rtt_ms=5.0,
                     repeats=3, measure_seconds=0.0, out=tmp_path / "bundles" / "tiny", name="tiny")
    doc = PlanDocument.from_json(json.loads((tmp_path / "bundles" / "tiny" / "plan.json").read_text()))
    assert doc == result.plan_document
    cloud = doc.candidate(CLOUD_ONLY)
    assert cloud.codec is not None and cloud.codecs is not None and "fp32" in cloud.codecs  # the raw input, costed
    assert cloud.total_ms == min(c["total_ms"] for c in cloud.codecs.values())
    assert cloud.encode_ms == cloud.codecs[cloud.codec]["encode_ms"] > 0  # timed here, scaled to the rpi4
    assert doc.candidate(EDGE_ONLY).codec is None
    assert all(r.codec is not None for r in doc.plan_table if r.cut != EDGE_ONLY)
    bundle = Bundle.load(tmp_path / "bundles" / "tiny")
    assert bundle.codec_for(CLOUD_ONLY) == cloud.codec

    x = sample_input(seed=9)
    full = ort.InferenceSession(str(bundle.full)).run(None, {INPUT: x})[0]
    server = CloudServer(tmp_path / "bundles", "127.0.0.1", 0, max_wait_ms=1.0)
    server.start()
    try:
        with EdgeAgent.from_bundle(bundle.root, server.address, cut=CLOUD_ONLY, connect_timeout_s=2.0,
                                   tls=device_tls(DEFAULT_DEVICE_ID)) as agent:
            assert agent.codec == cloud.codec
            res = agent.infer(x, timeout=30)
    finally:
        server.stop(grace=1.0)
    assert res.served_by == CLOUD and res.cut == CLOUD_ONLY, res.fallback_reason
    assert res.sent_bytes == codec.wire_bytes([codec.encode(INPUT, x, cloud.codec)])
    np.testing.assert_allclose(res.outputs["output"], full, atol=0.05)  # lossy codecs passed the gate
