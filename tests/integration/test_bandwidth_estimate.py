"""The agent's uplink estimate through the real link proxy and a real cloud server (tiny bundle, mTLS).

Behaviour, not timing: at each proxy rate the estimate lands within 0.5x-2x of the rate, which the health
check RTT alone (the estimator before the fixed-cost fit) missed on fast links (a 12 KB probe read 37 Mbit/s
at 100). The requests alternate with calibration probes (the same cut in the other codec), as AdaptiveCut
sends them. Requests carry a batch of 16 (128 KB in fp32 at the cut): a tiny bundle's single sample (8 KB)
spends 0.3 ms on a 200 Mbit/s link, less than a loaded test host's jitter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_tier import CloudServer
from cloud_tier.lab.linkproxy import LinkProxy
from edge_agent import EdgeAgent
from models.tiny_bundle import MID_CUT, make_tiny_bundle, sample_input
from tests import polling

ROUNDS = 12
BATCH = 16


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bandwidth-bundles")
    make_tiny_bundle(root / "tiny")
    return root


@pytest.fixture(scope="module")
def cloud(tiny_bundles: Path) -> Iterator[CloudServer]:
    with CloudServer(tiny_bundles, max_batch=BATCH, max_wait_ms=0) as server:
        yield server


@pytest.mark.parametrize("mbps", [5, 50, 200])
def test_the_estimate_follows_the_proxy_rate(tiny_bundles: Path, cloud: CloudServer, device_tls, mbps: float):
    x = sample_input(BATCH, 3)
    with LinkProxy("127.0.0.1", cloud.port, uplink_mbps=mbps, delay_ms=1.0) as proxy, \
            EdgeAgent.from_bundle(tiny_bundles / "tiny", proxy.address, cut=MID_CUT, codec="fp32",
                                  deadline_ms=20_000, connect_timeout_s=10.0, device_id="bw",
                                  tls=device_tls("bw")) as agent:
        polling.wait_for(lambda: agent.mode == "split", "the agent in split mode", 20.0)
        for _ in range(ROUNDS):
            assert agent.measure_rtt() is not None
            res = agent.infer(x, timeout=20.0)
            assert res.served_by == "cloud" and res.sent_bytes > BATCH * 8000
            assert agent.probe_link(MID_CUT, calibration=True)  # one sample in int8: 2 KB
        est = agent.bandwidth.estimate()
        fit = agent.bandwidth.fit()
        assert fit is not None, "calibration probes of another size give the fixed-cost fit"
        # the agent passes each request's send stamp and the cloud's receive stamp: the estimate is fitted on
        # one-way times, which hold no reply-side stall of the device
        assert agent.bandwidth.fit(one_way=True) is not None
        # the median (what telemetry shows): at 200 Mbit/s the proxy itself delivers less than its setting on a
        # shared 2-core host (64-134 Mbit/s measured quiet, 83-98 under load), so its floor there is a third
        low = 0.5 if mbps < 200 else 1 / 3
        assert est.mbps is not None and low * mbps <= est.mbps <= 2.0 * mbps, (est, fit, agent.bandwidth.rtt_ms())
        # the rate the cut policy decides by (the samples' 75th percentile) is as close
        assert est.upper_mbps is not None and 0.5 * mbps <= est.upper_mbps <= 2.0 * mbps, est
