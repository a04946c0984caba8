"""Uplink estimation and the adaptive cut policy on synthetic samples (no sockets, no agent)."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest

from edge_agent.bandwidth import AdaptiveCut, BandwidthEstimator, CutPolicy, Estimate, calibration_codec
from edge_agent.config import AdaptiveConfig, AgentConfig, ConfigError, describe

RTT_MS = 2.0


def link_ms(nbytes: int, mbps: float, rtt_ms: float = RTT_MS) -> float:
    """Network time of one request alone on a link of `mbps` with round trip `rtt_ms`."""
    return rtt_ms + nbytes * 8 / (mbps * 1000.0)


def isolated(est: BandwidthEstimator, n: int, nbytes: int, mbps: float, t0: float = 100.0) -> float:
    """Feed n requests that each had the link to themselves (1 s apart); return the last receive time."""
    t = t0
    for _ in range(n):
        t += 1.0
        est.add(nbytes, link_ms(nbytes, mbps), t)
    return t


def test_isolated_requests_with_a_known_rtt_give_the_link_rate():
    est = BandwidthEstimator(window=8)
    est.add_rtt(RTT_MS, 100.0)
    t = isolated(est, 8, 20_000, 5.0)
    e = est.estimate(now=t)
    assert e.rtt_ms == RTT_MS and e.samples == 8
    assert e.mbps == pytest.approx(5.0, rel=1e-6)


def test_without_an_rtt_the_estimate_is_a_lower_bound():
    est = BandwidthEstimator(window=8)
    t = isolated(est, 8, 20_000, 5.0)
    e = est.estimate(now=t)
    assert e.rtt_ms is None and 4.0 < e.mbps < 5.0


def calibrated(mbps: float, nbytes: int, fixed_ms: float, jitter_ms: float, seed: int = 0) -> BandwidthEstimator:
    """An estimator fed like the agent: requests of `nbytes` at `mbps` + a fixed cost the health check (0.2 ms)
    does not see + positive jitter, one calibration probe at 4x the bytes every other request."""
    rng = random.Random(seed)
    est = BandwidthEstimator(window=10)
    est.add_rtt(0.2, 0.0)
    t = 0.0
    for i in range(20):
        t += 0.5
        est.add(nbytes, fixed_ms + nbytes * 8 / (mbps * 1000.0) + rng.uniform(0, jitter_ms), t)
        if i % 2:
            big = 4 * nbytes
            est.add(big, fixed_ms + big * 8 / (mbps * 1000.0) + rng.uniform(0, jitter_ms), t + 0.1, calibration=True)
    return est


@pytest.mark.parametrize("mbps", [2, 5, 10, 20, 50, 100, 200, 500])
@pytest.mark.parametrize("nbytes, jitter_ms", [(150_000, 0.3), (37_632, 0.1)])
def test_the_fixed_per_request_cost_is_learned_and_not_counted_as_link_time(mbps, nbytes, jitter_ms):
    for seed in range(3):
        est = calibrated(mbps, nbytes, fixed_ms=1.5, jitter_ms=jitter_ms, seed=seed)
        e = est.estimate(now=11.0)
        assert e.samples == 10  # calibration probes feed the fit, not the rate window
        assert e.mbps == pytest.approx(mbps, rel=0.2), (seed, e)
        intercept, slope_mbps = est.fit(now=11.0)
        assert intercept == pytest.approx(1.5, abs=0.3) and slope_mbps == pytest.approx(mbps, rel=0.2)


def test_without_calibration_the_fixed_cost_reads_as_a_slow_link():
    # what the agent measured before the fit: 12 KB at 100 Mbit/s read ~37 Mbit/s
    est = BandwidthEstimator(window=8)
    est.add_rtt(0.2, 0.0)
    t = isolated(est, 8, 12_000, 100.0, t0=0.0)
    for i in range(8):  # same requests, 1.5 ms fixed cost on top
        est.add(12_000, 1.5 + 12_000 * 8 / 100_000, t + i + 1)
    assert est.fit(now=t + 9) is None and est.estimate(now=t + 9).mbps < 60


def test_fit_needs_two_sizes_apart_and_handles_sub_jitter_transfers():
    est = BandwidthEstimator()
    est.add(10_000, 3.0, 1.0)
    est.add(15_000, 3.5, 1.0, calibration=True)  # < 2x apart: no fit
    assert est.fit(now=1.0) is None and est.fixed_ms(now=1.0) is None
    est.add(40_000, 2.9, 1.0, calibration=True)  # 4x the bytes in no more time: link time below the jitter
    assert est.fit(now=1.0) == (2.9, float("inf")) and est.fixed_ms(now=1.0) == 2.9
    est.add_rtt(5.0, 1.0)  # a larger RTT wins (the intercept is at least the round trip)
    assert est.fixed_ms(now=1.0) == 5.0
    assert est.fit(now=100.0) is None  # expired
    est.clear()
    assert est.fit(now=1.0) is None


def test_calibration_codec_changes_the_size_fourfold():
    assert calibration_codec("int8") == "fp32" and calibration_codec("int8c+zstd") == "fp32"
    assert calibration_codec("fp32") == "int8" and calibration_codec("fp16+lz4") == "int8"


def test_rtt_is_the_minimum_of_recent_round_trips_and_expires():
    est = BandwidthEstimator(max_age_s=10.0)
    for t, r in ((0.0, 0.5), (5.0, 3.0), (6.0, 2.0)):
        est.add_rtt(r, t)
    assert est.rtt_ms(now=9.0) == 0.5
    assert est.rtt_ms(now=12.0) == 2.0  # the 0.5 ms one is older than max_age_s
    assert est.rtt_ms(now=30.0) is None


def test_queued_requests_are_measured_by_reply_spacing():
    # 10 requests sent at once on a 2 Mbit/s link: each waits for the ones before it, so network_ms grows;
    # bytes / network_ms would say ~0.4 Mbit/s, the reply spacing says 2.
    est = BandwidthEstimator(window=8)
    est.add_rtt(RTT_MS, 0.0)
    per = 10_000 * 8 / (2.0 * 1000.0)  # ms on the link per request
    for i in range(10):
        network = RTT_MS + per * (i + 1)
        est.add(10_000, network, t_done=1.0 + network / 1000.0)
    e = est.estimate(now=2.0)
    assert e.mbps == pytest.approx(2.0, rel=1e-6) and e.samples == 8


def test_replies_of_one_cloud_batch_are_not_samples():
    est = BandwidthEstimator(window=8)
    est.add(10_000, 50.0, t_done=1.0)
    est.add(10_000, 50.0, t_done=1.0)  # same instant: one batch
    e = est.estimate(now=1.0)
    assert e.samples == 1


def test_median_ignores_outliers_and_window_follows_a_rate_change():
    est = BandwidthEstimator(window=9)
    est.add_rtt(RTT_MS, 0.0)
    t = isolated(est, 9, 10_000, 10.0, t0=0.0)
    est.add(10_000, 0.001, t + 0.5)  # one absurd sample (10_000 bytes in ~0 ms)
    assert est.estimate(now=t + 1).mbps == pytest.approx(10.0, rel=1e-6)
    t = isolated(est, 5, 10_000, 0.5, t0=t + 1)  # the link slows down: 5 of 9 newest samples
    assert est.estimate(now=t).mbps == pytest.approx(0.5, rel=1e-6)


def test_old_samples_expire_and_edge_results_are_not_samples():
    est = BandwidthEstimator(max_age_s=5.0)
    est.add(0, 10.0, 1.0)  # nothing sent: an edge result
    est.add(1000, float("nan"), 1.0)
    assert est.estimate(now=1.0).samples == 0
    est.add(1000, 10.0, 1.0)
    assert est.estimate(now=2.0).samples == 1
    assert est.estimate(now=10.0) == Estimate(None, None, 0)


def test_add_is_thread_safe():
    est = BandwidthEstimator(window=50)

    def feed() -> None:
        for _ in range(2000):
            est.add(1000, 1.0)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert est.total_samples == 8000 and est.estimate().samples <= 50


TABLE = ((0.0, "edge-only"), (1.0, "c1"), (10.0, "cloud-only"))


def policy(current: str = "c1", **kw) -> CutPolicy:
    kw = {"hysteresis": 1.25, "min_dwell_s": 5.0, "min_samples": 3, "now": 0.0, **kw}
    return CutPolicy(TABLE, current, **kw)


def est(mbps: float | None, samples: int = 10) -> Estimate:
    return Estimate(mbps, 1.0, samples)


def test_policy_switches_only_past_the_boundary_by_the_ratio():
    p = policy()
    assert p.decide(est(11.0), 100.0) is None  # above 10 but not by 1.25x
    assert p.decide(est(12.6), 100.0) == "cloud-only"
    assert p.decide(est(0.9), 100.0) is None  # below 1 but not by 1.25x
    assert p.decide(est(0.7), 100.0) == "edge-only"
    assert p.decide(est(5.0), 100.0) is None


def test_policy_waits_for_dwell_and_samples():
    p = policy()
    assert p.decide(est(100.0), 4.9) is None  # held < min_dwell_s
    assert p.decide(est(100.0, samples=2), 100.0) is None  # too few samples
    assert p.decide(est(None), 100.0) is None
    assert p.decide(est(100.0), 5.0) == "cloud-only"


def test_policy_does_not_flap_at_a_constant_rate_near_a_boundary():
    p = policy(current="edge-only", min_dwell_s=0.0)
    switches = []
    for i, mbps in enumerate([1.3, 1.2, 1.3, 1.1, 0.95, 1.05, 0.9, 1.3, 1.26] * 5):
        cut = p.decide(est(mbps), float(i))
        if cut is not None:
            switches.append(cut)
            p.moved_to(cut, float(i))
    assert switches == ["c1"]  # up once (1.3 >= 1.25), never back down (never <= 0.8)


def test_policy_can_jump_several_rows_and_takes_the_table_choice_for_an_unlisted_cut():
    p = policy(current="edge-only")
    assert p.decide(est(50.0), 10.0) == "cloud-only"
    p = policy(current="c9")  # e.g. the bundle's chosen cut, not in the table
    assert p.decide(est(1.05), 10.0) == "c1"  # no ratio needed to leave an unlisted cut


def test_policy_moved_to_restarts_the_dwell():
    p = policy()
    p.moved_to("edge-only", 100.0)
    assert p.decide(est(5.0), 104.0) is None
    assert p.decide(est(5.0), 105.0) == "c1"


def test_policy_rejects_bad_tables():
    with pytest.raises(ValueError, match="at least one"):
        CutPolicy((), "c1")
    with pytest.raises(ValueError, match="hysteresis"):
        CutPolicy(TABLE, "c1", hysteresis=0.5)


class FakeBundle:
    plan_table = TABLE


class FakeAgent:
    """The surface AdaptiveCut uses, recording what it is asked to do."""

    def __init__(self, cut: str):
        self.bundle = FakeBundle()
        self.bandwidth = BandwidthEstimator(window=4)
        self.cut, self.mode, self.forced_local = cut, "split", False
        self.probed: list[str] = []
        self.calibrated: list[str] = []
        self.cuts: list[str] = []

    def set_cut(self, cut_id: str) -> None:
        self.cut = cut_id
        self.cuts.append(cut_id)

    def is_remote(self, cut_id: str) -> bool:
        return cut_id != "edge-only"

    def probe_link(self, cut_id: str, calibration: bool = False) -> bool:
        (self.calibrated if calibration else self.probed).append(cut_id)
        return True

    def measure_rtt(self) -> float | None:
        return None


def test_adaptive_cut_probes_on_edge_only_and_respects_pins():
    agent = FakeAgent("edge-only")
    ad = AdaptiveCut(agent, AdaptiveConfig(enabled=True, min_dwell_s=0.0, min_samples=2, probe_interval_s=0.01))
    assert ad.tick() is None and agent.probed == ["c1"]  # the cheapest remote cut of the table
    assert agent.calibrated == ["c1"]  # and a calibration probe on it
    t0 = time.perf_counter() - 10.0  # samples 1 s apart: each had the link to itself
    for i in range(4):
        agent.bandwidth.add(10_000, 10.0, t0 + i)  # 8 Mbit/s
    assert ad.tick() == "c1" and agent.cut == "c1"
    ad.pin("cloud-only")
    for i in range(4):
        agent.bandwidth.add(10_000, 200.0, t0 + 5 + i)  # 0.4 Mbit/s: would go edge-only, but pinned
    assert ad.tick() is None and agent.cut == "cloud-only"
    ad.resume()
    assert ad.tick() == "edge-only"
    agent.forced_local = True
    agent.set_cut("c1")
    assert ad.tick() is None and agent.cut == "c1"


def test_adaptive_cut_calibrates_on_the_current_remote_cut_at_its_own_interval():
    agent = FakeAgent("cloud-only")
    ad = AdaptiveCut(agent, AdaptiveConfig(enabled=True, min_dwell_s=86_400, probe_interval_s=0.01,
                                           calibration_interval_s=86_400))
    ad.tick()
    ad.tick()
    assert agent.probed == [] and agent.calibrated == ["cloud-only"] and ad.calibrations == 1  # not yet due again
    agent = FakeAgent("cloud-only")
    ad = AdaptiveCut(agent, AdaptiveConfig(enabled=True, min_dwell_s=86_400, calibration_interval_s=0))
    ad.tick()
    assert agent.calibrated == []  # 0: off


def test_config_tables_are_optional_and_validated():
    cfg = AgentConfig(bundle="b")
    assert cfg.mqtt is None and cfg.adaptive.enabled is False
    cfg = AgentConfig.from_dict({"bundle": "b", "mqtt": {"broker": "127.0.0.1:1883", "label": "kitchen cam"},
                                 "adaptive": {"enabled": True, "hysteresis": 1.5}})
    assert cfg.mqtt.address == ("127.0.0.1", 1883) and cfg.mqtt.label == "kitchen cam"
    assert cfg.adaptive.hysteresis == 1.5 and cfg.adaptive.min_samples >= 1
    assert "mqtt.broker" in describe() and "adaptive.min_dwell_s" in describe()
    for data, key in (({"mqtt": {}}, "mqtt.broker"), ({"mqtt": {"broker": "nope"}}, "mqtt.broker"),
                      ({"mqtt": {"broker": "h:1", "qos": 2}}, "mqtt.qos"),
                      ({"mqtt": {"broker": "h:1", "reconnect_min_s": 9, "reconnect_max_s": 2}}, "mqtt.reconnect_max_s"),
                      ({"adaptive": {"hysteresis": 0.9}}, "adaptive.hysteresis"),
                      ({"adaptive": {"enabled": "yes"}}, "adaptive.enabled"),
                      ({"adaptive": {"min_samples": 0}}, "adaptive.min_samples"),
                      ({"adaptive": {"calibration_interval_s": -1}}, "adaptive.calibration_interval_s")):
        with pytest.raises(ConfigError) as info:
            AgentConfig.from_dict({"bundle": "b", **data})
        assert info.value.key == key, (data, str(info.value))


# --- a device whose CPU quota delays its replies; a link that drops and recovers (synthetic clock) ---------------

SPLIT_TABLE = ((0.0, "edge-only"), (12.0, "c021"))


def throttled_ms(rng: random.Random, nbytes: int, mbps: float, fixed_ms: float = 3.0) -> float:
    """Network time of one request on a device whose CPU quota (cgroup cpu.max) often stalls the thread that
    receives the reply: fixed + bytes / rate + a positive delay on 70% of the requests."""
    stall = rng.uniform(0.0, 40.0) if rng.random() < 0.7 else 0.0
    return fixed_ms + nbytes * 8 / (mbps * 1000.0) + stall


def run_schedule(schedule, nbytes=60_000, probe_bytes=60_000, seed=1, by_median=False):
    """Drive a BandwidthEstimator and a CutPolicy (AdaptiveCut's defaults) through `schedule` = [(until_s, mbps)]:
    on c021 one request every 0.5 s, on edge-only one measurement probe every 2 s, a calibration probe (4x the
    bytes) every 5 s, an RTT every 2 s; the policy decides every 0.5 s (`by_median`: by the median alone, as it
    did before upper_mbps). Returns [(t, cut)] of the switches and the estimator."""
    rng = random.Random(seed)
    cfg = AdaptiveConfig(enabled=True)
    est = BandwidthEstimator()
    policy = CutPolicy(SPLIT_TABLE, "c021", hysteresis=cfg.hysteresis, min_dwell_s=cfg.min_dwell_s,
                       min_samples=cfg.min_samples)
    switches, t, last_probe, last_cal, last_rtt = [], 0.0, -1e9, -1e9, -1e9
    for until, mbps in schedule:
        while t < until:
            t += 0.5
            size = nbytes if policy.current == "c021" else probe_bytes
            if t - last_rtt >= cfg.probe_interval_s:
                last_rtt = t
                est.add_rtt(0.5, t)
            if policy.current == "c021":
                est.add(size, throttled_ms(rng, size, mbps), t)
            elif t - last_probe >= cfg.probe_interval_s:
                last_probe = t
                est.add(size, throttled_ms(rng, size, mbps), t)
            if t - last_cal >= cfg.calibration_interval_s:
                last_cal = t
                est.add(4 * size, throttled_ms(rng, 4 * size, mbps), t + 0.1, calibration=True)
            e = est.estimate(now=t + 0.2)
            cut = policy.decide(dataclasses.replace(e, upper_mbps=None) if by_median else e, t + 0.2)
            if cut is not None:
                policy.moved_to(cut, t + 0.2)
                switches.append((t, cut))
    return switches, est


def test_a_throttled_device_does_not_read_a_fast_link_as_slow():
    # the benchmark's failure: at 20 Mbit/s the median read below 12 / 1.25 and the agent left its split
    left_by_median = 0
    for seed in range(8):
        switches, est = run_schedule([(60.0, 20.0)], seed=seed)
        e = est.estimate(now=60.2)
        assert switches == [] and e.upper_mbps == pytest.approx(20.0, rel=0.25), (seed, e)
        assert e.mbps < e.upper_mbps  # the median is dragged down by the stalls
        left_by_median += bool(run_schedule([(60.0, 20.0)], seed=seed, by_median=True)[0])
    assert left_by_median >= 6  # deciding by the median (as the policy did) left the split on this fast link


@pytest.mark.parametrize("seed", range(8))
def test_after_a_drop_and_recovery_the_split_comes_back_within_18_s(seed):
    switches, _ = run_schedule([(30.0, 20.0), (60.0, 2.0), (90.0, 20.0)], seed=seed)
    assert [c for _, c in switches] == ["edge-only", "c021"], switches
    (left, _), (back, _) = switches
    assert 30.0 < left <= 40.0  # left within 10 s of the drop
    assert 60.0 < back <= 78.0  # back within 18 s of the recovery (mostly 6-10 s), on edge-only probes alone


def test_estimate_reports_the_median_and_the_upper_quantile():
    est = BandwidthEstimator(window=10)
    est.add_rtt(RTT_MS, 0.0)
    t = 0.0
    for mbps in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10):
        t += 1.0
        est.add(10_000, link_ms(10_000, mbps), t)
    e = est.estimate(now=t)
    assert e.mbps == pytest.approx(5.5) and e.upper_mbps == pytest.approx(8.0)
    # the policy decides by upper_mbps when it is set, else by the median
    policy = CutPolicy(TABLE, "edge-only", hysteresis=1.0, min_dwell_s=0, min_samples=1)
    assert policy.decide(Estimate(0.5, None, 10, upper_mbps=None), 1.0) is None
    assert policy.decide(Estimate(0.5, None, 10, upper_mbps=e.upper_mbps), 1.0) == "c1"


class _Tensor:
    def __init__(self, n: int):
        self.n, self.dtype = n, "float32"

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.n)


class SizedBundle(FakeBundle):
    """Cut payloads: c1 1 KB, cloud-only 200 KB (int8)."""

    sizes = {"c1": 1_000, "cloud-only": 200_000, "edge-only": 0}

    def cut(self, cut_id: str):
        return type("Cut", (), {"tensors": [_Tensor(self.sizes[cut_id])]})()


@pytest.mark.parametrize("budget_kb, expected", [(1024.0, "c1"), (0.0, "cloud-only"), (10_000.0, "cloud-only")])
def test_edge_only_probes_carry_the_largest_payload_the_budget_allows(budget_kb, expected):
    agent = FakeAgent("edge-only")
    agent.bundle = SizedBundle()
    ad = AdaptiveCut(agent, AdaptiveConfig(enabled=True, probe_interval_s=2.0, probe_budget_kb_per_min=budget_kb))
    ad.tick()
    assert agent.probed == [expected]
