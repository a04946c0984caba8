"""The supervisor: gets an agent that went LOCAL back to SPLIT, and sends the probes that decide it.

While the agent is LOCAL (and not forced there, nor closing) on a cut that sends something, one thread
reconnects with exponential backoff and full jitter (edge_agent/retry.py; the supervisor is the only one
that moves the retry counter), checks health, and returns the agent to SPLIT only after the health check says
SERVING and `probe_count` probe requests succeed. Probes are real requests (the head's output for a zeros
input, marked `probe`) whose replies the agent routes here by their id prefix; each answered probe also feeds
the agent's bandwidth estimate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np

from edge_agent.bandwidth import BandwidthEstimator, calibration_codec
from edge_agent.config import AgentConfig
from edge_agent.results import SPLIT, AgentMode
from edge_agent.retry import RetryPolicy
from edge_agent.runtime import CutRuntime
from edge_agent.transport import CloudLink, LinkDown
from protos import serde
from protos.serde import CloudReply, CloudRequest

__all__ = ["PROBE_PREFIX", "Supervisor"]

log = logging.getLogger("splitinfer.edge")

PROBE_PREFIX = "~probe-"


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1000.0


class _Probe:
    __slots__ = ("event", "reply", "generation")

    def __init__(self, generation: int | None):
        self.event = threading.Event()
        self.reply: CloudReply | None = None
        self.generation = generation


class Supervisor:
    """Reconnects, health-checks and probes the cloud for one agent; its thread wakes on `wake()`."""

    def __init__(
        self,
        config: AgentConfig,
        link: CloudLink,
        bandwidth: BandwidthEstimator,
        *,
        state: Callable[[], AgentMode],
        runtime: Callable[[], CutRuntime],
        switch: Callable[[str, str], None],
        still_local: Callable[[str], None],
        count: Callable[[str], None],
        next_id: Callable[[], int],
        model_sha256: str = "",
        codec: Callable[[str], str] | None = None,
    ):
        """`state`/`runtime`: the agent's mode and current cut; `switch(mode, reason)`; `still_local(why)`
        records why a reconnect failed; `count(name)` bumps an AgentStats counter; `next_id` numbers probes;
        `model_sha256`: the bundle's model hash, sent with each probe as with each request; `codec(cut_id)`:
        the codec the agent sends that cut with (default: the config's)."""
        self.config = config
        self._link = link
        self._bandwidth = bandwidth
        self._state = state
        self._runtime = runtime
        self._switch = switch
        self._still_local = still_local
        self._count = count
        self._next_id = next_id
        self._model_sha256 = model_sha256
        self._codec = codec or (lambda cut_id: config.codec)
        self.open_lock = threading.Lock()  # the supervisor and measurement probes both may open the link
        self._lock = threading.Lock()
        self._probes: dict[str, _Probe] = {}
        self._probe_payloads: dict[str, dict[str, np.ndarray]] = {}
        self._retry = RetryPolicy(config.backoff)
        self._last_code: grpc.StatusCode | None = None  # status of the last failed probe, for the retry policy
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="splitinfer-supervisor", daemon=True)

    # -- control --------------------------------------------------------------------------------

    def start(self, failed_at_start: bool = False) -> None:
        """Start the thread; `failed_at_start`: the agent's first connect failed (its retry counts as one)."""
        if failed_at_start:
            self._retry.next_delay()
        if self._state().mode != SPLIT:
            self._wake.set()  # connect in the background
        self._thread.start()

    def wake(self) -> None:
        """Look at the agent's mode now (after a switch to LOCAL, or a new remote cut)."""
        self._wake.set()

    def resume(self) -> None:
        """set_mode('split'): forget earlier failures and try to reconnect now."""
        self._retry.reset()
        self._wake.set()

    def stop(self) -> None:
        """Tell the thread to end (see `join`)."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> None:
        """Wait (bounded) for the thread to end."""
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- events the agent routes here -----------------------------------------------------------

    def on_reply(self, reply: CloudReply) -> bool:
        """Take a probe's reply (True), or say it is not a probe's (False)."""
        if not reply.request_id.startswith(PROBE_PREFIX):
            return False
        with self._lock:
            probe = self._probes.pop(reply.request_id, None)
        if probe is not None:
            probe.reply = reply
            probe.event.set()
        return True

    def on_broken(self, generation: int) -> None:
        """Stream `generation` broke: its probes get no reply."""
        with self._lock:
            probes = [p for p in self._probes.values() if p.generation == generation]
        for probe in probes:
            probe.event.set()  # no reply: the probe failed

    # -- reconnecting ---------------------------------------------------------------------------

    def _supervise(self) -> None:
        """While LOCAL (and not forced), try to get back to SPLIT with backoff and jitter."""
        delay: float | None = None
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            st = self._state()
            if st.mode == SPLIT or st.forced_local or st.closing or not self._runtime().remote:
                delay = None
                continue
            ok, why = self.try_split()
            if ok:
                self._retry.reset()
                self._switch(SPLIT, "cloud healthy and probes answered")
                delay = None
            else:
                self._still_local(why)
                with self._lock:
                    code, self._last_code = self._last_code, None
                delay = self._retry.delay_after(code)
                log.info("cloud still unavailable (%s); next attempt in %.2f s", why, delay)

    def try_split(self) -> tuple[bool, str]:
        """Reconnect if needed, check health, then send probe_count probes; (ok, why not)."""
        with self.open_lock:
            opened = self._link.generation is None
            if opened:
                try:
                    self._link.open()
                except LinkDown as exc:
                    return False, str(exc)
        if opened:
            self._count("reconnects")
        else:
            ok, why = self._link.health()
            if not ok:
                self._link.drop(why)
                return False, why
        rt = self._runtime()
        for _ in range(self.config.probe_count):
            ok, why = self.probe(rt)
            if not ok:
                self._link.drop(why)
                return False, why
        return True, ""

    # -- probes ---------------------------------------------------------------------------------

    def probe(self, rt: CutRuntime, calibration: bool = False) -> tuple[bool, str]:
        """Send one probe carrying `rt`'s payload and wait (deadline_ms) for its reply; (ok, why not).

        `calibration`: encoded in `calibration_codec(codec)` (another size) and fed to the estimator's fit only.
        """
        cfg = self.config
        payload = self._probe_payloads.get(rt.cut_id)
        if payload is None:
            payload = self._probe_payloads[rt.cut_id] = rt.run_head(rt.zeros_input())
        pid = f"{PROBE_PREFIX}{cfg.device_id}-{self._next_id()}"
        codec = self._codec(rt.cut_id)
        codec_spec = calibration_codec(codec) if calibration else codec
        request = serde.prepare(CloudRequest(
            pid, cfg.device_id, rt.model_name, rt.cut_id, serde.encode_tensors(payload, codec_spec),
            deadline_ms=cfg.deadline_ms, probe=True, sent_unix_ns=time.time_ns(), model_sha256=self._model_sha256,
        ))
        probe = _Probe(self._link.generation)
        with self._lock:
            self._probes[pid] = probe
        self._count("probes_sent")
        try:
            t_sent = time.perf_counter()
            self._link.send(request)
            answered = probe.event.wait(cfg.deadline_ms / 1000.0)
        except LinkDown as exc:
            answered, probe.reply = True, None
            why = f"probe not sent: {exc}"
        else:
            why = "probe: the stream broke" if answered else f"probe: no reply in {cfg.deadline_ms} ms"
        with self._lock:
            self._probes.pop(pid, None)
        reply = probe.reply
        if reply is not None and reply.ok:
            self._bandwidth.add(request.tensors.wire_bytes, max(0.0, _ms(t_sent, reply.received_at) - reply.cloud_ms),
                                reply.received_at, calibration=calibration, sent_unix_ns=request.sent_unix_ns,
                                received_unix_ns=reply.received_unix_ns)
            return True, ""
        if reply is not None:
            why = f"probe: cloud error {serde.status_name(reply.code)}: {reply.message}"
            with self._lock:
                self._last_code = serde.status_code(reply.code)
        self._count("probes_failed")
        return False, why
