"""EdgeAgent: runs the head on the device, the tail in the cloud, and finishes on the device when it must.

Modes: SPLIT (head here, tail in the cloud) and LOCAL (head then the local tail here; for the edge-only cut
the head is the whole model). Every submitted request gets exactly one result: whoever removes a request
from the pending table (the reply, the deadline watcher, a broken stream, close) is the only one that may
finish it, so a late cloud reply for a request already finished on the device is dropped and counted.

Fallback: a request that misses its deadline (counted from when it was sent) or whose stream breaks is
finished on the device by running the local tail on the activation it already has, and the agent switches to
LOCAL. A supervisor thread reconnects with exponential backoff and full jitter and returns to SPLIT only after
the health check says SERVING and `probe_count` probe requests succeed.

Per-request cloud errors: the request is finished on the device with `fallback_reason` "cloud error CODE: msg".
INVALID_ARGUMENT, FAILED_PRECONDITION and OUT_OF_RANGE are about that request's data, so the agent stays in
SPLIT; any other code (NOT_FOUND: the cloud does not serve this cut, RESOURCE_EXHAUSTED, UNAVAILABLE,
INTERNAL, ...) says the cloud cannot serve us now, so the agent goes LOCAL and probes before coming back.

Bandwidth: every cloud round trip and probe feeds `self.bandwidth` (edge_agent/bandwidth.py); with
`[adaptive] enabled` an AdaptiveCut thread switches the cut by that estimate and the bundle's plan table.

Threads: `workers` edge threads run heads and local tails (so the next head runs while the last request is
on the wire; `infer` runs its head on the calling thread instead); gRPC's sender and one receiver thread per
stream; a deadline watcher; the supervisor.
`on_result` and future callbacks run on those threads: keep them short.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from edge_agent import constants as C
from edge_agent.bandwidth import AdaptiveCut, BandwidthEstimator
from edge_agent.config import AgentConfig
from edge_agent.results import (
    CLOUD,
    EDGE,
    LOCAL,
    SPLIT,
    AgentClosedError,
    AgentStats,
    InferenceResult,
    InFlightLimitError,
    StageTimes,
)
from edge_agent.retry import RetryPolicy
from edge_agent.runtime import CutRuntime, RunnerCache, RuntimeOptions, prepare_inputs
from edge_agent.transport import CloudLink, CloudReply, LinkDown, encode_request, request_bytes, status_name
from models.manifest import Bundle

log = logging.getLogger("splitinfer.edge")

# Cloud status codes about one request's data: finish it here but keep the cloud.
PER_REQUEST_CODES = frozenset(
    c.value[0]
    for c in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE)
)
PROBE_PREFIX = "~probe-"

LinkFactory = Callable[..., Any]


class _Request:
    """One request's state on its way through the agent."""

    __slots__ = (
        "id", "future", "rt", "inputs", "t_submit", "queue_ms", "head_ms", "encode_ms", "t_sent",
        "t_gave_up", "activation", "generation", "sent_bytes", "done",
    )

    def __init__(self, request_id: str, rt: CutRuntime, inputs: dict[str, np.ndarray]):
        self.id = request_id
        self.future: Future[InferenceResult] = Future()
        self.future.set_running_or_notify_cancel()  # a result is always delivered: callers cannot cancel it
        self.rt = rt
        self.inputs: dict[str, np.ndarray] | None = inputs
        self.t_submit = time.perf_counter()
        self.queue_ms = self.head_ms = self.encode_ms = 0.0
        self.t_sent = self.t_gave_up = 0.0
        self.activation: dict[str, np.ndarray] = {}
        self.generation: int | None = None
        self.sent_bytes = 0
        self.done = False


class _Probe:
    __slots__ = ("event", "reply", "generation")

    def __init__(self, generation: int | None):
        self.event = threading.Event()
        self.reply: CloudReply | None = None
        self.generation = generation


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1000.0


class EdgeAgent:
    """Split inference on one device: submit inputs, get InferenceResults (cloud or edge), never lose one."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        on_result: Callable[[InferenceResult], None] | None = None,
        connect: bool = True,
        link_factory: LinkFactory = CloudLink,
    ):
        self.config = config
        self.bundle = Bundle.load(config.bundle)
        self._cache = RunnerCache(
            RuntimeOptions(config.intra_op_threads, config.inter_op_threads, tuple(config.providers))
        )
        self._runtimes: dict[str, CutRuntime] = {}
        self._rt = self._runtime(config.cut or self.bundle.chosen)
        self._on_result = on_result
        self._result_listeners: list[Callable[[InferenceResult], None]] = []
        self._state_listeners: list[Callable[[str, str], None]] = []
        self.bandwidth = BandwidthEstimator()
        self._open_lock = threading.Lock()  # the supervisor and probe_link both may open the link
        self._lock = threading.RLock()
        # Built before any thread starts: it checks every plan-table cut loads.
        self.adaptive: AdaptiveCut | None = AdaptiveCut(self, config.adaptive) if config.adaptive.enabled else None
        self._changed = threading.Condition(self._lock)  # mode switches and finished requests
        self._stats = AgentStats(mode=LOCAL, cut=self._rt.cut_id)
        self._mode = LOCAL
        self._mode_reason = "not connected yet"
        self._forced_local = False
        self._closing = False
        self._pending: dict[str, _Request] = {}  # sent to the cloud, not finished
        self._unfinished = 0
        self._probes: dict[str, _Probe] = {}
        self._probe_payloads: dict[str, dict[str, np.ndarray]] = {}
        self._ids = itertools.count(1)
        self._slots = threading.BoundedSemaphore(config.max_in_flight)
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="splitinfer-edge")
        self._deadlines: list[tuple[float, int, str]] = []
        self._deadline_seq = itertools.count()
        self._deadline_cv = threading.Condition(threading.Lock())
        self._watch_until = 0.0  # perf_counter time the deadline watcher sleeps until (0: not asleep)
        self._retry = RetryPolicy(config.backoff)
        self._last_code: grpc.StatusCode | None = None  # status of the last failed probe, for the retry policy
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._link = link_factory(config, self._on_reply, self._on_broken)
        self._watcher = threading.Thread(target=self._watch_deadlines, name="splitinfer-deadlines", daemon=True)
        self._watcher.start()
        if connect and self._rt.remote:
            ok, why = self._try_split()
            if ok:
                self._switch(SPLIT, "connected")
            else:
                self._mode_reason = why
                log.warning("cloud %s unavailable at start (%s); serving on the device", config.cloud, why)
                self._retry.next_delay()  # the first background attempt counts as a retry
        if self._mode == LOCAL:
            self._wake.set()  # the supervisor connects in the background
        self._supervisor = threading.Thread(target=self._supervise, name="splitinfer-supervisor", daemon=True)
        self._supervisor.start()
        if self.adaptive is not None:
            self.adaptive.start()

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        cloud: str = C.DEFAULT_CLOUD,
        *,
        on_result: Callable[[InferenceResult], None] | None = None,
        connect: bool = True,
        **fields: Any,
    ) -> "EdgeAgent":
        """An agent for the bundle at `path` talking to `cloud` ("host:port"); `fields` are AgentConfig keys."""
        cfg = AgentConfig.from_dict({"bundle": path, "cloud": cloud, **fields}, source="EdgeAgent.from_bundle")
        return cls(cfg, on_result=on_result, connect=connect)

    # -- public API -----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """SPLIT or LOCAL."""
        return self._mode

    @property
    def cut(self) -> str:
        """The cut new requests start on."""
        return self._rt.cut_id

    @property
    def forced_local(self) -> bool:
        """Whether set_mode('local') holds the agent on the device."""
        return self._forced_local

    def is_remote(self, cut_id: str) -> bool:
        """Whether cut `cut_id` of the bundle sends anything to the cloud (every cut but edge-only)."""
        return self._runtime(cut_id).remote

    def add_result_listener(self, fn: Callable[[InferenceResult], None]) -> None:
        """Also call `fn(result)` for every result (after on_result); keep it short: it runs on agent threads."""
        self._result_listeners.append(fn)

    def add_state_listener(self, fn: Callable[[str, str], None]) -> None:
        """Call `fn(mode, cut)` whenever the mode or the cut changes; keep it short: it runs on agent threads."""
        self._state_listeners.append(fn)

    def measure_rtt(self) -> float | None:
        """Time one health check on the open stream's channel (a tiny round trip) into `bandwidth`; ms or None."""
        if self._link.generation is None:
            return None
        t0 = time.perf_counter()
        ok, _why = self._link.health()
        if not ok:
            return None
        rtt = _ms(t0, time.perf_counter())
        self.bandwidth.add_rtt(rtt)
        return rtt

    def probe_link(self, cut_id: str) -> bool:
        """Send one measurement probe carrying `cut_id`'s payload (it feeds `bandwidth`); whether it was answered.

        Opens the link first only while the agent runs a cut that sends nothing (edge-only): for remote cuts
        reconnecting is the supervisor's job.
        """
        rt = self._runtime(cut_id)
        if not rt.remote or self._closing or self._forced_local:
            return False
        with self._open_lock:
            if self._link.generation is None:
                if self._rt.remote:
                    return False
                try:
                    self._link.open()
                except LinkDown as exc:
                    log.debug("measurement probe: cloud %s unreachable: %s", self.config.cloud, exc)
                    return False
        ok, _why = self._probe(rt)
        return ok

    def infer(self, x: Any, timeout: float | None = None) -> InferenceResult:
        """Run one request to completion (cloud or edge) and return its result.

        The head runs on the calling thread, which waits anyway: one thread hand-over less than `submit`.
        """
        req = self._admit(x, block=True, timeout=None)
        self._run(req)
        return req.future.result(timeout)

    def submit(self, x: Any, *, block: bool = True, timeout: float | None = None) -> Future[InferenceResult]:
        """Start a request; waits (up to `timeout`) for one of max_in_flight slots, else InFlightLimitError."""
        req = self._admit(x, block=block, timeout=timeout)
        self._pool.submit(self._run, req)
        return req.future

    def _admit(self, x: Any, *, block: bool, timeout: float | None) -> "_Request":
        """Check the input, take an in-flight slot and count the request; the caller then runs it."""
        rt = self._rt
        inputs = prepare_inputs(x, rt.inputs)
        if self._closing:
            raise AgentClosedError("the agent is closed; make a new EdgeAgent")
        if not self._slots.acquire(blocking=block, timeout=timeout if block else None):
            with self._lock:
                self._stats.refused += 1
            raise InFlightLimitError(
                f"max_in_flight={self.config.max_in_flight} requests are unfinished; wait for results "
                f"or raise max_in_flight"
            )
        req = _Request(f"{self.config.device_id}-{next(self._ids)}", rt, inputs)
        with self._lock:
            if self._closing:
                self._slots.release()
                raise AgentClosedError("the agent is closed; make a new EdgeAgent")
            self._unfinished += 1
            self._stats.submitted += 1
        return req

    def stats(self) -> AgentStats:
        """A snapshot of the counters, the mode and the cut."""
        with self._lock:
            self._stats.mode = self._mode
            self._stats.cut = self._rt.cut_id
            self._stats.in_flight = self._unfinished
            self._stats.extra["mode_reason"] = self._mode_reason
            return self._stats.snapshot()

    def set_cut(self, cut_id: str) -> None:
        """Start new requests on `cut_id`; requests in flight finish on the cut they started on."""
        rt = self._runtime(cut_id)
        with self._lock:
            changed = self._rt is not rt
            self._rt = rt
            self._stats.cut = cut_id
        if rt.remote and self._mode == LOCAL and not self._forced_local:
            self._wake.set()
        if changed:
            self._notify_state()

    def set_mode(self, mode: str) -> None:
        """"local": stay on the device until told otherwise; "split": go back to the cloud once probes pass."""
        if mode == LOCAL:
            with self._lock:
                self._forced_local = True
            self._switch(LOCAL, "set_mode('local')")
        elif mode == SPLIT:
            with self._lock:
                self._forced_local = False
            self._retry.reset()
            self._wake.set()
        else:
            raise ValueError(f"mode: expected {SPLIT!r} or {LOCAL!r}, got {mode!r}")

    def wait_for_mode(self, mode: str, timeout: float) -> bool:
        """Block until the agent is in `mode` (True) or `timeout` seconds pass (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._mode == mode, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, let those in flight finish (the stragglers on the device), stop threads."""
        with self._lock:
            if self._closing and self._stop.is_set():
                return
            self._closing = True
        if self.adaptive is not None:
            self.adaptive.stop()
        drain = C.CLOSE_DRAIN_S if timeout is None else timeout
        with self._changed:
            self._changed.wait_for(lambda: self._unfinished == 0, drain)
            stragglers = [self._claim(rid) for rid in list(self._pending)]
        for req in stragglers:
            if req is not None:
                self._fallback(req, "agent closing", switch=False)
        with self._changed:
            self._changed.wait_for(lambda: self._unfinished == 0, drain)
        self._stop.set()
        self._wake.set()
        with self._deadline_cv:
            self._deadline_cv.notify_all()
        self._link.close()
        self._supervisor.join(5.0)
        self._watcher.join(5.0)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "EdgeAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the request path -----------------------------------------------------------------------

    def _runtime(self, cut_id: str) -> CutRuntime:
        rt = self._runtimes.get(cut_id)
        if rt is None:
            rt = self._runtimes[cut_id] = CutRuntime(self.bundle, cut_id, self.config.head_precision, self._cache)
        return rt

    def _run(self, req: _Request) -> None:
        """On an edge worker: the head, then the cloud or the local tail."""
        try:
            t0 = time.perf_counter()
            req.queue_ms = _ms(req.t_submit, t0)
            req.activation = req.rt.run_head(req.inputs)  # type: ignore[arg-type]
            req.inputs = None
            t1 = time.perf_counter()
            req.head_ms = _ms(t0, t1)
            if not req.rt.remote:
                self._finish_local(req, None)
                return
            if self._mode == LOCAL:
                self._finish_local(req, f"local mode: {self._mode_reason}")
                return
            msg = encode_request(
                req.id, device_id=self.config.device_id, model=req.rt.model_name, cut=req.rt.cut_id,
                tensors=req.activation, codec_spec=self.config.codec, deadline_ms=self.config.deadline_ms,
            )
            req.sent_bytes = request_bytes(msg)
            req.t_sent = time.perf_counter()
            req.encode_ms = _ms(t1, req.t_sent)
            with self._lock:
                req.generation = self._link.generation
                self._pending[req.id] = req  # before sending: the reply may beat send() back
                self._stats.sent += 1
            try:
                gen = self._link.send(msg)
            except LinkDown as exc:
                with self._lock:
                    self._stats.sent -= 1
                if self._claim(req.id) is not None:
                    self._fallback(req, f"link down: {exc}")
                return
            with self._lock:
                req.generation = gen
            self._add_deadline(req)
            if gen != self._link.generation:  # the stream broke while we queued: its report may have missed us
                self._on_broken(gen, "stream broken while sending")
        except Exception as exc:  # the model failed on the device: the caller gets the exception as its result
            self._claim(req.id)
            self._complete(req, None, exc)

    def _claim(self, request_id: str) -> _Request | None:
        """Take a sent request out of the pending table; only the claimer may finish it."""
        with self._lock:
            req = self._pending.pop(request_id, None)
        if req is not None:
            req.t_gave_up = time.perf_counter()
        return req

    def _fallback(self, req: _Request, reason: str, switch: bool = True) -> None:
        """Finish a claimed request on the device (same activation: no work repeated); maybe go LOCAL."""
        with self._lock:
            self._stats.fallbacks += 1
        if switch:
            self._switch(LOCAL, reason)
        try:
            self._pool.submit(self._finish_local_safe, req, reason)
        except RuntimeError:  # the pool is shut down (closing): finish here
            self._finish_local_safe(req, reason)

    def _finish_local_safe(self, req: _Request, reason: str | None) -> None:
        try:
            self._finish_local(req, reason)
        except Exception as exc:
            self._complete(req, None, exc)

    def _finish_local(self, req: _Request, reason: str | None) -> None:
        t0 = time.perf_counter()
        outputs = req.rt.run_tail(req.activation)
        t1 = time.perf_counter()
        waited = _ms(req.t_sent, req.t_gave_up) if req.t_sent and req.t_gave_up else 0.0
        timing = StageTimes(
            queue_ms=req.queue_ms, head_ms=req.head_ms, encode_ms=req.encode_ms, network_ms=waited,
            tail_ms=_ms(t0, t1), total_ms=_ms(req.t_submit, t1),
        )
        result = InferenceResult(
            request_id=req.id, outputs=outputs, served_by=EDGE, cut=req.rt.cut_id, timing=timing,
            fallback_reason=reason, sent_bytes=req.sent_bytes,
        )
        self._complete(req, result, None)

    def _finish_cloud(self, req: _Request, reply: CloudReply) -> None:
        cloud_ms = reply.queue_ms + reply.compute_ms + reply.decode_ms
        now = time.perf_counter()
        network_ms = max(0.0, _ms(req.t_sent, reply.received_at) - cloud_ms)
        self.bandwidth.add(req.sent_bytes, network_ms, reply.received_at)
        timing = StageTimes(
            queue_ms=req.queue_ms, head_ms=req.head_ms, encode_ms=req.encode_ms,
            network_ms=network_ms,
            cloud_queue_ms=reply.queue_ms, tail_ms=reply.compute_ms, total_ms=_ms(req.t_submit, now),
        )
        result = InferenceResult(
            request_id=req.id, outputs=reply.outputs, served_by=CLOUD, cut=req.rt.cut_id, timing=timing,
            batch_size=reply.batch_size, sent_bytes=req.sent_bytes,
        )
        self._complete(req, result, None)

    def _complete(self, req: _Request, result: InferenceResult | None, exc: BaseException | None) -> None:
        """Deliver a request's one result (or exception), free its slot, count it."""
        with self._changed:
            if req.done:
                self._stats.duplicate_finishes += 1
                log.error("request %s finished twice; the second result is dropped", req.id)
                return
            req.done = True
            self._unfinished -= 1
            if exc is not None:
                self._stats.failed += 1
            elif result is not None and result.served_by == CLOUD:
                self._stats.served_cloud += 1
            else:
                self._stats.served_edge += 1
            self._changed.notify_all()
        self._slots.release()
        req.activation = {}
        if exc is not None:
            req.future.set_exception(exc)
            return
        req.future.set_result(result)  # type: ignore[arg-type]
        for fn in (self._on_result, *self._result_listeners):
            if fn is None:
                continue
            try:
                fn(result)  # type: ignore[arg-type]
            except Exception:  # a telemetry hook must not take the agent down; logged with its traceback
                with self._lock:
                    self._stats.callback_errors += 1
                log.exception("on_result callback failed for %s", req.id)

    # -- events from the link -------------------------------------------------------------------

    def _on_reply(self, generation: int, reply: CloudReply) -> None:
        if reply.request_id.startswith(PROBE_PREFIX):
            with self._lock:
                probe = self._probes.pop(reply.request_id, None)
            if probe is not None:
                probe.reply = reply
                probe.event.set()
            return
        req = self._claim(reply.request_id)
        if req is None:
            with self._lock:
                self._stats.late_replies_dropped += 1
            return
        if reply.ok:
            self._finish_cloud(req, reply)
            return
        with self._lock:
            self._stats.cloud_errors += 1
        reason = f"cloud error {status_name(reply.code)}: {reply.message}"
        self._fallback(req, reason, switch=reply.code not in PER_REQUEST_CODES)

    def _on_broken(self, generation: int, reason: str) -> None:
        with self._lock:
            ids = [rid for rid, r in self._pending.items() if r.generation == generation]
            probes = [p for p in self._probes.values() if p.generation == generation]
        for probe in probes:
            probe.event.set()  # no reply: the probe failed
        claimed = [r for r in (self._claim(rid) for rid in ids) if r is not None]
        if claimed or (self._mode == SPLIT and self._link.generation is None and not self._closing):
            self._switch(LOCAL, reason)
        for req in claimed:
            self._fallback(req, reason, switch=False)

    # -- deadlines ------------------------------------------------------------------------------

    def _add_deadline(self, req: _Request) -> None:
        due = req.t_sent + self.config.deadline_ms / 1000.0
        with self._deadline_cv:
            heapq.heappush(self._deadlines, (due, next(self._deadline_seq), req.id))
            if due < self._watch_until:  # the watcher would sleep past it: wake it (else no thread wake-up)
                self._deadline_cv.notify()

    def _watch_deadlines(self) -> None:
        """Finish on the device every sent request whose reply is later than deadline_ms."""
        while not self._stop.is_set():
            expired: list[str] = []
            with self._deadline_cv:
                now = time.perf_counter()
                while self._deadlines and self._deadlines[0][0] <= now:
                    expired.append(heapq.heappop(self._deadlines)[2])
                if not expired:
                    wait = min(self._deadlines[0][0] - now if self._deadlines else 1.0, 1.0)
                    self._watch_until = now + wait
                    self._deadline_cv.wait(wait)
                    self._watch_until = 0.0  # awake: a new deadline needs no wake-up call
                    continue
            for rid in expired:
                req = self._claim(rid)  # None: it was answered in time
                if req is not None:
                    with self._lock:
                        self._stats.deadline_misses += 1
                    self._fallback(req, f"deadline of {self.config.deadline_ms} ms exceeded")

    # -- mode and recovery ----------------------------------------------------------------------

    def _switch(self, mode: str, reason: str) -> None:
        with self._changed:
            if mode == SPLIT and self._forced_local:
                return
            self._mode_reason = reason if mode == LOCAL else ""
            if self._mode == mode:
                return
            self._mode = mode
            self._stats.mode_switches += 1
            self._stats.mode = mode
            self._changed.notify_all()
        log.info("mode -> %s (%s)", mode, reason)
        if mode == LOCAL:
            self._wake.set()
        self._notify_state()

    def _notify_state(self) -> None:
        mode, cut = self._mode, self._rt.cut_id
        for fn in self._state_listeners:
            try:
                fn(mode, cut)
            except Exception:  # a state hook must not take the agent down; logged with its traceback
                log.exception("state listener failed (mode %s, cut %s)", mode, cut)

    def _supervise(self) -> None:
        """While LOCAL (and not forced), try to get back to SPLIT with backoff and jitter."""
        delay: float | None = None
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._mode == SPLIT or self._forced_local or self._closing or not self._rt.remote:
                delay = None
                continue
            ok, why = self._try_split()
            if ok:
                self._retry.reset()
                self._switch(SPLIT, "cloud healthy and probes answered")
                delay = None
            else:
                with self._lock:
                    self._mode_reason = why
                    code, self._last_code = self._last_code, None
                delay = self._retry.delay_after(code)
                log.info("cloud still unavailable (%s); next attempt in %.2f s", why, delay)

    def _try_split(self) -> tuple[bool, str]:
        """Reconnect if needed, check health, then send probe_count probes; (ok, why not)."""
        with self._open_lock:
            opened = self._link.generation is None
            if opened:
                try:
                    self._link.open()
                except LinkDown as exc:
                    return False, str(exc)
        if opened:
            with self._lock:
                self._stats.reconnects += 1
        else:
            ok, why = self._link.health()
            if not ok:
                self._link.drop(why)
                return False, why
        rt = self._rt
        for _ in range(self.config.probe_count):
            ok, why = self._probe(rt)
            if not ok:
                self._link.drop(why)
                return False, why
        return True, ""

    def _probe(self, rt: CutRuntime) -> tuple[bool, str]:
        payload = self._probe_payloads.get(rt.cut_id)
        if payload is None:
            payload = self._probe_payloads[rt.cut_id] = rt.run_head(rt.zeros_input())
        pid = f"{PROBE_PREFIX}{self.config.device_id}-{next(self._ids)}"
        msg = encode_request(
            pid, device_id=self.config.device_id, model=rt.model_name, cut=rt.cut_id, tensors=payload,
            codec_spec=self.config.codec, deadline_ms=self.config.deadline_ms, probe=True,
        )
        probe = _Probe(self._link.generation)
        with self._lock:
            self._probes[pid] = probe
            self._stats.probes_sent += 1
        try:
            t_sent = time.perf_counter()
            self._link.send(msg)
            answered = probe.event.wait(self.config.deadline_ms / 1000.0)
        except LinkDown as exc:
            answered, probe.reply = True, None
            why = f"probe not sent: {exc}"
        else:
            why = "probe: the stream broke" if answered else f"probe: no reply in {self.config.deadline_ms} ms"
        with self._lock:
            self._probes.pop(pid, None)
        reply = probe.reply
        if reply is not None and reply.ok:
            cloud_ms = reply.queue_ms + reply.compute_ms + reply.decode_ms
            self.bandwidth.add(request_bytes(msg), max(0.0, _ms(t_sent, reply.received_at) - cloud_ms),
                               reply.received_at)
            return True, ""
        if reply is not None:
            why = f"probe: cloud error {status_name(reply.code)}: {reply.message}"
            self._last_code = next((c for c in grpc.StatusCode if c.value[0] == reply.code), None)
        with self._lock:
            self._stats.probes_failed += 1
        return False, why
