"""The agent's split/local state machine without sockets: a scripted in-process link stands in for gRPC.

The fake link runs the real tail (onnxruntime) on the real encoded request, so results are real; only the
network is scripted (answer, hang, break, error). Real-server behaviour is in tests/integration.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edge_agent import (
    CLOUD,
    EDGE,
    LOCAL,
    SPLIT,
    AgentClosedError,
    AgentConfig,
    EdgeAgent,
    InFlightLimitError,
    InputError,
)
from edge_agent.transport import LinkDown
from models.manifest import CLOUD_ONLY, EDGE_ONLY, Bundle
from protos.serde import CloudReply
from tests import polling

# models/tiny_bundle.py builds its bundle with onnx (the [profile] extra): the [edge]-only job skips this file.
pytest.importorskip("onnx", reason="needs the [profile] extra (onnx) to build the test bundle")
pytestmark = pytest.mark.needs_profile

from models.tiny_bundle import make_tiny_bundle, sample_input  # noqa: E402

INT8_ATOL = 0.05  # the int8 head's error on this model's logits (|logits| ~ 1) is ~0.02; see test_agent_runtime


def poll(cond, timeout: float = 5.0, what: str = "condition") -> None:
    """Wait for `cond()` to hold, failing after `timeout` seconds."""
    polling.wait_for(cond, what, timeout, interval_s=0.005)


class FakeLink:
    """The CloudLink interface with a scripted cloud: behaviour is "ok", "hang", "error:<CODE>" or "down"."""

    def __init__(self, cfg, on_reply, on_broken, tail_path=None):
        self.cfg = cfg
        self.on_reply = on_reply
        self.on_broken = on_broken
        self.behaviour = "ok"
        self.generation_ = None
        self.gens = 0
        self.sent: list = []
        self.held: list = []  # requests a hanging cloud holds
        self.lock = threading.Lock()
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.bundle = Bundle.load(cfg.bundle)

    @property
    def generation(self):
        return self.generation_

    def open(self):
        if self.behaviour == "down":
            raise LinkDown("connection refused")
        self.gens += 1
        self.generation_ = self.gens
        return self.gens

    def health(self):
        # a "hang" cloud still answers health checks (overloaded, not dead): its probes time out instead
        return self.behaviour != "down", self.behaviour

    def send(self, msg):
        if self.generation_ is None:
            raise LinkDown("no stream")
        gen = self.generation_
        with self.lock:
            self.sent.append(msg.request_id)
        if self.behaviour == "hang":
            self.held.append((gen, msg))
        else:
            threading.Thread(target=self._answer, args=(gen, msg), daemon=True).start()
        return gen

    def _answer(self, gen, msg):
        if self.behaviour.startswith("error:"):
            code = grpc.StatusCode[self.behaviour.split(":", 1)[1]].value[0]
            self.on_reply(gen, CloudReply(msg.request_id, code, "scripted error", received_at=time.perf_counter()))
            return
        tail = self.bundle.cut(msg.cut).tail
        sess = self.sessions.setdefault(msg.cut, ort.InferenceSession(str(tail)))
        feeds = msg.tensors.decode()
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        self.on_reply(gen, CloudReply(msg.request_id, 0, "", outs, compute_ms=0.1, batch_size=1,
                                      received_at=time.perf_counter()))

    def release_held(self):
        """A hung cloud wakes up: answer everything it held (late replies)."""
        held, self.held = self.held, []
        self.behaviour = "ok"
        for gen, msg in held:
            self._answer(gen, msg)

    def break_stream(self):
        gen, self.generation_ = self.generation_, None
        self.on_broken(gen, "stream broken: UNAVAILABLE: scripted")

    def drop(self, reason=""):
        if self.generation_ is not None:
            self.break_stream()

    def close(self, timeout_s=2.0):
        self.generation_ = None


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("agent_state") / "tiny")


@pytest.fixture(scope="module")
def full_model(bundle_dir):
    sess = ort.InferenceSession(str(Bundle.load(bundle_dir).full))
    return lambda x: sess.run(None, {"input": x})[0]


def make_agent(bundle_dir, links: list, on_result=None, **fields) -> EdgeAgent:
    fields.setdefault("deadline_ms", 300)
    fields.setdefault("probe_count", 2)
    fields.setdefault("backoff", {"initial_s": 0.01, "max_s": 0.05})
    cfg = AgentConfig.from_dict({"bundle": str(bundle_dir), "cloud": "127.0.0.1:1", **fields})

    def factory(cfg, on_reply, on_broken):
        link = FakeLink(cfg, on_reply, on_broken)
        links.append(link)
        return link

    return EdgeAgent(cfg, link_factory=factory, on_result=on_result)


def test_split_results_come_from_the_cloud_and_match_the_full_model(bundle_dir, full_model):
    links: list[FakeLink] = []
    with make_agent(bundle_dir, links) as agent:
        assert agent.mode == SPLIT and agent.cut == "c1"
        x = sample_input()
        res = agent.infer(x, timeout=5)
        assert res.served_by == CLOUD and res.cut == "c1" and res.fallback_reason is None
        np.testing.assert_allclose(res.output, full_model(x), atol=INT8_ATOL)
        assert res.timing.total_ms >= res.timing.head_ms >= 0 and res.sent_bytes == 8 * 16 * 16  # int8 codec
        st = agent.stats()
    assert st.sent == 1 and st.served_cloud == 1 and st.probes_sent == 2 and st.duplicate_finishes == 0


def test_deadline_miss_finishes_on_device_and_late_reply_is_dropped(bundle_dir, full_model):
    links: list[FakeLink] = []
    with make_agent(bundle_dir, links, deadline_ms=100) as agent:
        link = links[0]
        link.behaviour = "hang"
        xs = [sample_input(seed=i) for i in range(5)]
        futs = [agent.submit(x) for x in xs]
        results = [f.result(timeout=5) for f in futs]
        assert all(r.served_by == EDGE and r.fallback_reason for r in results)
        assert "deadline of 100 ms exceeded" in results[0].fallback_reason
        for x, r in zip(xs, results):
            np.testing.assert_allclose(r.output, full_model(x), atol=INT8_ATOL)
        assert agent.mode == LOCAL
        # in LOCAL mode new requests never touch the link
        before = len(link.sent)
        assert agent.infer(xs[0], timeout=5).served_by == EDGE and len(link.sent) == before
        late = sum(1 for _, m in link.held if not m.probe)
        assert late >= 1
        link.release_held()  # the cloud answers too late: dropped, counted, not delivered twice
        poll(lambda: agent.stats().late_replies_dropped == late, what="late replies counted")
        poll(lambda: agent.mode == SPLIT, what="back to split after probes")
        assert agent.infer(xs[1], timeout=5).served_by == CLOUD
        st = agent.stats()
    assert st.deadline_misses >= 1 and st.fallbacks == late and st.duplicate_finishes == 0
    assert st.served_edge == 6 and st.served_cloud == 1 and st.mode_switches >= 2


def test_broken_stream_with_many_in_flight_loses_none(bundle_dir):
    links: list[FakeLink] = []
    seen: Counter = Counter()
    cfg_fields = dict(deadline_ms=5000, max_in_flight=64)
    agent = make_agent(bundle_dir, links, on_result=lambda r: seen.update([r.request_id]), **cfg_fields)
    try:
        link = links[0]
        link.behaviour = "hang"
        futs = [agent.submit(sample_input(seed=i)) for i in range(40)]
        poll(lambda: len(link.held) == 40, what="40 requests on the wire")
        link.behaviour = "down"
        link.break_stream()
        results = [f.result(timeout=5) for f in futs]
    finally:
        agent.close()
    assert len({r.request_id for r in results}) == 40
    assert all(r.served_by == EDGE and "stream broken" in r.fallback_reason for r in results)
    assert set(seen.values()) == {1} and len(seen) == 40
    st = agent.stats()
    assert st.fallbacks == 40 and st.served_edge == 40 and st.duplicate_finishes == 0 and st.mode == LOCAL


def test_cloud_down_at_start_serves_locally_then_recovers(bundle_dir):
    links: list[FakeLink] = []
    cfg = AgentConfig.from_dict({"bundle": str(bundle_dir), "cloud": "127.0.0.1:1", "probe_count": 3,
                                 "backoff": {"initial_s": 0.01, "max_s": 0.02}})

    def factory(cfg, on_reply, on_broken):
        link = FakeLink(cfg, on_reply, on_broken)
        link.behaviour = "down"
        links.append(link)
        return link

    with EdgeAgent(cfg, link_factory=factory) as agent:
        assert agent.mode == LOCAL
        r = agent.infer(sample_input(), timeout=5)
        assert r.served_by == EDGE and r.fallback_reason.startswith("local mode")
        links[0].behaviour = "ok"
        assert agent.wait_for_mode(SPLIT, 5)
        assert agent.stats().probes_sent >= 3 and agent.stats().reconnects >= 1


def test_per_request_error_finishes_locally_and_keeps_split(bundle_dir):
    links: list[FakeLink] = []
    with make_agent(bundle_dir, links) as agent:
        links[0].behaviour = "error:INVALID_ARGUMENT"
        r = agent.infer(sample_input(), timeout=5)
        assert r.served_by == EDGE and r.fallback_reason.startswith("cloud error INVALID_ARGUMENT")
        assert agent.mode == SPLIT and agent.stats().cloud_errors == 1


def test_cloud_refusing_the_cut_sends_agent_local(bundle_dir):
    links: list[FakeLink] = []
    with make_agent(bundle_dir, links, backoff={"initial_s": 5.0, "max_s": 5.0}) as agent:
        links[0].behaviour = "error:NOT_FOUND"
        r = agent.infer(sample_input(), timeout=5)
        assert r.served_by == EDGE and "NOT_FOUND" in r.fallback_reason
        assert agent.wait_for_mode(LOCAL, 2)
        # the recovery attempt probes and fails: the agent stays local
        poll(lambda: agent.stats().probes_failed >= 1, what="a failed probe")
        assert agent.mode == LOCAL


def test_edge_only_cut_never_uses_the_cloud(bundle_dir, full_model):
    links: list[FakeLink] = []
    with make_agent(bundle_dir, links, cut=EDGE_ONLY, head_precision="fp32") as agent:
        x = sample_input()
        r = agent.infer(x, timeout=5)
        assert r.served_by == EDGE and r.fallback_reason is None and r.cut == EDGE_ONLY
        np.testing.assert_allclose(r.output, full_model(x), rtol=1e-5, atol=1e-5)
        assert links[0].sent == []
        # Its health says why it is local (it used to read "not connected yet" for ever).
        assert "runs entirely on the device" in agent.stats().extra["mode_reason"]


def test_set_cut_keeps_in_flight_requests_on_their_cut(bundle_dir):
    links: list[FakeLink] = []
    with make_agent(bundle_dir, links, deadline_ms=5000) as agent:
        links[0].behaviour = "hang"
        fut = agent.submit(sample_input())
        poll(lambda: len(links[0].held) == 1, what="request on the wire")
        agent.set_cut(CLOUD_ONLY)
        links[0].release_held()
        assert fut.result(timeout=5).cut == "c1"
        r = agent.infer(sample_input(), timeout=5)
        assert r.cut == CLOUD_ONLY and r.served_by == CLOUD and agent.stats().cut == CLOUD_ONLY


def test_set_mode_local_sticks_until_split_is_asked(bundle_dir):
    links: list[FakeLink] = []
    with make_agent(bundle_dir, links) as agent:
        agent.set_mode("local")
        assert agent.mode == LOCAL
        assert agent.infer(sample_input(), timeout=5).served_by == EDGE
        assert not agent.wait_for_mode(SPLIT, 0.2)  # no recovery while forced
        agent.set_mode("split")
        assert agent.wait_for_mode(SPLIT, 5)
        with pytest.raises(ValueError, match="mode"):
            agent.set_mode("cloud")


def test_in_flight_bound_refuses_and_says_so(bundle_dir):
    links: list[FakeLink] = []
    with make_agent(bundle_dir, links, max_in_flight=2, deadline_ms=5000) as agent:
        links[0].behaviour = "hang"
        futs = [agent.submit(sample_input()) for _ in range(2)]
        with pytest.raises(InFlightLimitError, match="max_in_flight=2"):
            agent.submit(sample_input(), block=False)
        with pytest.raises(InFlightLimitError):
            agent.submit(sample_input(), timeout=0.05)
        assert agent.stats().refused == 2
        links[0].release_held()
        assert all(f.result(timeout=5).served_by == CLOUD for f in futs)


def test_bad_input_is_refused_before_it_counts(bundle_dir):
    links: list[FakeLink] = []
    with make_agent(bundle_dir, links) as agent:
        with pytest.raises(InputError, match=r"input 'input': expected shape \('N', 3, 16, 16\)"):
            agent.submit(np.zeros((1, 3, 8, 8), np.float32))
        with pytest.raises(InputError, match="unknown inputs"):
            agent.submit({"pixels": sample_input()})
        assert agent.stats().submitted == 0


def test_close_finishes_what_is_in_flight_and_refuses_more(bundle_dir):
    links: list[FakeLink] = []
    agent = make_agent(bundle_dir, links, deadline_ms=10_000)
    links[0].behaviour = "hang"
    futs = [agent.submit(sample_input()) for _ in range(3)]
    poll(lambda: len(links[0].held) == 3, what="requests on the wire")
    agent.close(timeout=0.2)
    results = [f.result(timeout=0) for f in futs]
    assert all(r.served_by == EDGE and r.fallback_reason == "agent closing" for r in results)
    with pytest.raises(AgentClosedError):
        agent.submit(sample_input())
