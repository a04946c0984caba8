"""The adaptive cut on a throttled device: the estimator fits one-way times (the device's send stamp to the cloud's
receive stamp, whatever the clocks' offset), and the policy's band edges sit where the cuts' latencies cross, so that
a link back at the rate of a plan-table row returns to that row's cut (issue 18's 20 -> 2 -> 20 Mbit/s run)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from edge_agent.bandwidth import BandwidthEstimator, CutPolicy, Estimate, band_edges, plan_costs
from edge_agent.config import AdaptiveConfig

# mobilenet_v2 on an emulated jetson-nano, planned for wifi (18.88 Mbit/s): the plan table and each cut's
# (total_ms, payload bytes) from that run's plan.json
UPLINK = 18.88
TABLE = ((0.5, "edge-only"), (5.0, "edge-only"), (10.0, "c038"), (20.0, "c021"), (50.0, "c021"),
         (100.0, "cloud-only"))
CANDIDATES = {"edge-only": (100.0, 0), "c038": (89.5, 12_640), "c021": (88.2, 25_184), "cloud-only": (122.4, 150_624)}
PLAN = {"network": {"uplink_mbps": UPLINK},
        "candidates": [{"id": k, "total_ms": ms, "transfer_bytes": b} for k, (ms, b) in CANDIDATES.items()]}


def bundle(plan: dict = PLAN) -> SimpleNamespace:
    return SimpleNamespace(plan=plan, plan_table=TABLE,
                           candidate=lambda cid: next(c for c in plan["candidates"] if c["id"] == cid))


def test_band_edges_sit_where_the_cuts_latencies_cross():
    edges = band_edges(TABLE, plan_costs(bundle()))
    fixed = {k: ms - 8 * b / (1000 * UPLINK) for k, (ms, b) in CANDIDATES.items()}
    cross = 8 * (25_184 - 12_640) / (1000 * (fixed["c038"] - fixed["c021"]))  # c038 -> c021: ~15 Mbit/s
    assert edges[3] == pytest.approx(cross) and 10.0 < cross < 20.0
    assert 5.0 < edges[2] < 10.0 and 50.0 < edges[5] < 100.0  # edge-only -> c038, c021 -> cloud-only
    assert edges[4] == 50.0  # the same cut on both rows: nothing changes there
    # Without costs a bare table keeps its rows' rates; a cut the plan does not cost: the geometric mean.
    assert band_edges(TABLE) == [m for m, _ in TABLE]
    partial = {**PLAN, "candidates": [c for c in PLAN["candidates"] if c["id"] != "c038"]}
    assert band_edges(TABLE, plan_costs(bundle(partial)))[3] == pytest.approx((10.0 * 20.0) ** 0.5)
    assert plan_costs(SimpleNamespace(plan={"candidates": []})) is None  # no uplink named: no costs


def test_a_link_back_at_a_rows_rate_returns_to_its_cut():
    # The table's c021 row is at 20 Mbit/s. With that as the band edge and hysteresis 1.25, an agent that had
    # left c021 needed 25 Mbit/s to come back: a 20 -> 2 -> 20 step never returned. Its band starts at the
    # crossover (~15), so 20 Mbit/s clears it by the ratio, and c021 is kept down to ~12.
    cfg = AdaptiveConfig(enabled=True)
    p = CutPolicy(TABLE, "c021", hysteresis=cfg.hysteresis, min_dwell_s=0.0, min_samples=1,
                  cost=plan_costs(bundle()))
    seen = []
    for t, mbps in enumerate([20.0] * 5 + [2.0] * 5 + [20.0] * 5):
        cut = p.decide(Estimate(mbps, 1.0, 10), float(t))
        if cut is not None:
            p.moved_to(cut, float(t))
            seen.append(cut)
    assert seen == ["edge-only", "c021"]
    assert p.decide(Estimate(13.0, 1.0, 10), 100.0) is None  # above 15 / 1.25: c021 holds
    assert p.decide(Estimate(11.0, 1.0, 10), 101.0) == "c038"


@pytest.mark.parametrize("offset_s", [0.0, 3.7, -2.1])
def test_one_way_times_leave_out_the_devices_reply_stalls_whatever_the_clock_offset(offset_s):
    # A device whose CPU quota stalls the thread that receives the reply: up to 40 ms on 70% of the requests, in
    # the round trip only. The one-way time (send stamp on the device's clock to receive stamp on the cloud's)
    # has no reply in it; the clocks' offset cancels in the fit of two sizes. Round trips alone read the link slow.
    rng = random.Random(7)
    mbps, nbytes = 20.0, 25_184
    one_way, rt = BandwidthEstimator(), BandwidthEstimator()
    for est in (one_way, rt):
        est.add_rtt(1.0, 0.0)
    t = 0.0
    for i in range(40):
        t += 0.5
        for size, cal in ((nbytes, False), (4 * nbytes, True)) if i % 10 == 0 else ((nbytes, False),):
            up_ms = 1.5 + size * 8 / (mbps * 1000.0)
            stall = rng.uniform(0.0, 40.0) if rng.random() < 0.7 else 0.0
            sent_ns = int(t * 1e9)
            received_ns = sent_ns + int((up_ms + offset_s * 1000.0) * 1e6)
            network_ms = up_ms + 1.0 + stall
            one_way.add(size, network_ms, t + 0.05, calibration=cal, sent_unix_ns=sent_ns,
                        received_unix_ns=received_ns)
            rt.add(size, network_ms, t + 0.05, calibration=cal)
    e, r = one_way.estimate(now=t + 0.1), rt.estimate(now=t + 0.1)
    assert e.mbps == pytest.approx(mbps, rel=0.1) and e.upper_mbps == pytest.approx(mbps, rel=0.1)
    assert r.mbps < 0.6 * mbps  # the stalls read as link time
    # Replies without the cloud's stamp (an older cloud) are round trips, as before.
    old = BandwidthEstimator()
    old.add_rtt(1.0, 0.0)
    old.add(nbytes, 1.0 + nbytes * 8 / (mbps * 1000.0), 1.0, sent_unix_ns=5, received_unix_ns=0)
    assert old.estimate(now=1.0).mbps == pytest.approx(mbps)


def test_queued_requests_are_measured_by_the_clouds_receive_spacing():
    # Two requests sent back to back: the second waited for the first on the link, so its one-way time holds
    # two transfers; the spacing of the cloud's receive stamps (one clock) is its own transfer. Its reply was
    # stalled 20 ms on the device, so the spacing of the replies (the round trips' measure) reads it slow.
    mbps, size = 10.0, 50_000
    xfer_ms = size * 8 / (mbps * 1000.0)

    def fed(stamps: bool) -> BandwidthEstimator:
        est = BandwidthEstimator()
        est.add_rtt(2.0, 0.0)
        for i, n in enumerate((size, 4 * size)):  # the fit: one of each size, alone on the link
            up = 2.0 + n * 8 / (mbps * 1000.0)
            sent = int((1.0 + i) * 1e9)
            est.add(n, up, 1.0 + i, calibration=True, sent_unix_ns=sent if stamps else 0,
                    received_unix_ns=sent + int(up * 1e6))
        sent = int(10e9)
        first = sent + int((2.0 + xfer_ms) * 1e6)
        est.add(size, 2.0 + xfer_ms, 10.1, sent_unix_ns=sent if stamps else 0, received_unix_ns=first)
        est.add(size, 2.0 + 2 * xfer_ms + 20.0, 10.1 + (xfer_ms + 20.0) / 1000.0, sent_unix_ns=sent if stamps else 0,
                received_unix_ns=first + int(xfer_ms * 1e6))
        return est

    assert fed(stamps=True).estimate(now=10.2).mbps == pytest.approx(mbps, rel=0.02)
    assert fed(stamps=False).estimate(now=10.2).mbps < 0.9 * mbps  # the second read 6.7 Mbit/s
