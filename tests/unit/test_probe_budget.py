"""The adaptive cut's calibration probes stay within their payload budget per minute
(`[adaptive] probe_budget_kb_per_min`); measurement probes (sent only while the cut sends nothing) are not capped."""

from __future__ import annotations

from types import SimpleNamespace

from edge_agent.bandwidth import AdaptiveCut, BandwidthEstimator
from edge_agent.config import AdaptiveConfig, AgentConfig
from models.manifest import TensorSpec

CUT_TENSOR = TensorSpec("act", (None, 8, 32, 32), "float32")  # 8192 values: 8 KB in int8, 32 KB in fp32


class Bundle:
    plan_table = ((0.5, "edge-only"), (8.0, "c1"))

    def cut(self, cut_id: str) -> SimpleNamespace:
        return SimpleNamespace(tensors=[CUT_TENSOR])


class Agent:
    def __init__(self) -> None:
        self.bundle, self.bandwidth = Bundle(), BandwidthEstimator()
        self.config = SimpleNamespace(codec="int8")
        self.cut, self.mode, self.forced_local = "edge-only", "local", False
        self.sent: list[tuple[str, bool]] = []

    def set_cut(self, cut_id: str) -> None:
        self.cut = cut_id

    def is_remote(self, cut_id: str) -> bool:
        return cut_id != "edge-only"

    def probe_link(self, cut_id: str, calibration: bool = False) -> bool:
        self.sent.append((cut_id, calibration))
        return True

    def measure_rtt(self) -> None:
        return None


def _ticks(budget_kb: float, n: int = 20) -> tuple[Agent, AdaptiveCut]:
    agent = Agent()
    ad = AdaptiveCut(agent, AdaptiveConfig(enabled=True, min_dwell_s=86_400, probe_interval_s=1e-6,
                                           calibration_interval_s=1e-6, probe_budget_kb_per_min=budget_kb))
    for _ in range(n):
        ad.tick()
    return agent, ad


def test_probe_sizes_follow_the_codec():
    ad = AdaptiveCut(Agent(), AdaptiveConfig(enabled=True))
    assert ad.probe_bytes("c1") == 8192 and ad.probe_bytes("c1", calibration=True) == 4 * 8192


def test_calibration_probes_stop_at_the_budget_and_zero_means_no_cap():
    agent, ad = _ticks(100.0)  # 100 KB a minute: three 32 KB calibration probes fit, the fourth does not
    calibrations = [s for s in agent.sent if s[1]]
    assert calibrations == [("c1", True)] * 3 and ad.calibrations == 3 and ad.probes_over_budget == 17
    assert agent.sent.count(("c1", False)) == 20  # every measurement probe went: they are how the link is seen
    agent, ad = _ticks(0.0)
    assert len(agent.sent) == 40 and ad.probes_over_budget == 0


def test_the_budget_is_a_config_key_with_a_default():
    assert AgentConfig(bundle="b").adaptive.probe_budget_kb_per_min == 1024.0
    cfg = AgentConfig.from_dict({"bundle": "b", "adaptive": {"probe_budget_kb_per_min": 256}})
    assert cfg.adaptive.probe_budget_kb_per_min == 256.0


def test_a_calibration_probe_over_the_whole_budget_is_logged_once(caplog):
    # 32 KB calibration probes against a 16 KB budget: none can ever go, which turns calibration off.
    with caplog.at_level("WARNING", logger="splitinfer.edge.adaptive"):
        agent, ad = _ticks(16.0)
    assert ad.calibrations == 0 and ad.probes_over_budget == 20
    warned = [r for r in caplog.records if "exceeds probe_budget_kb_per_min" in r.getMessage()]
    assert len(warned) == 1 and "32 KB" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="splitinfer.edge.adaptive"):
        _ticks(100.0)  # each fits the budget: waiting for room is normal, not worth a warning
    assert not [r for r in caplog.records if "exceeds" in r.getMessage()]
