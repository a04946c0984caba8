"""EdgeAgent: runs the head on the device, the tail in the cloud, and finishes on the device when it must.

Modes: SPLIT (head here, tail in the cloud) and LOCAL (head then the local tail here; for the edge-only cut
the head is the whole model). Every submitted request gets exactly one result: whoever removes a request
from the pending table (the reply, the deadline watcher, a broken stream, close) is the only one that may
finish it, so a late cloud reply for a request already finished on the device is dropped and counted.

Fallback: a request that misses its deadline (counted from when it was sent) or whose stream breaks is
finished on the device by running the local tail on the activation it already has, and the agent switches to
LOCAL. The supervisor (edge_agent/supervisor.py) reconnects with exponential backoff and full jitter and returns
to SPLIT only after the health check says SERVING and `probe_count` probe requests succeed.

The mode is one frozen `AgentMode` (mode, reason, forced_local, closing), replaced as a whole under the agent's
lock; readers take the current value without the lock and see a consistent one.

What comes back is checked: an OK reply whose outputs are not the model's (names, dtypes, shapes with the
request's batch) is a failure of that request, finished on the device like a deadline miss and counted in
`cloud_errors` and `extra["bad_replies"]`, never as served by the cloud; the agent goes LOCAL. A request
whose message would exceed the gRPC message limit is not sent: it is finished on the device (counted in
`extra["oversize_requests"]`), and the stream, with the other requests on it, goes on.

Per-request cloud errors: the request is finished on the device with `fallback_reason` "cloud error CODE: msg".
INVALID_ARGUMENT, FAILED_PRECONDITION and OUT_OF_RANGE are about that request's data, so the agent stays in
SPLIT; any other code (NOT_FOUND: the cloud does not serve this cut, RESOURCE_EXHAUSTED, UNAVAILABLE,
INTERNAL, ...) says the cloud cannot serve us now, so the agent goes LOCAL and probes before coming back.

Codec: with config codec "auto" (the default) each cut's tensors are sent with the plan's codec for that cut
(plan.json candidates[].codec; when the cut is switched to by the plan table, that row's codec at the current
uplink estimate); a plan without codecs means int8. A codec named in the config is used for every cut.

Bandwidth: every cloud round trip and probe feeds `self.bandwidth` (edge_agent/bandwidth.py); with
`[adaptive] enabled` an AdaptiveCut thread switches the cut by that estimate and the bundle's plan table.

Threads: `workers` edge threads run heads and local tails (so the next head runs while the last request is
on the wire; `infer` runs its head on the calling thread instead); gRPC's sender and one receiver thread per
stream; the deadline watcher (edge_agent/deadlines.py); the supervisor.
`on_result` and future callbacks run on those threads: keep them short.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_agent import constants as C
from edge_agent.bandwidth import AdaptiveCut, BandwidthEstimator
from edge_agent.config import AgentConfig
from edge_agent.deadlines import DeadlineWatcher
from edge_agent.results import (
    CLOUD,
    EDGE,
    LOCAL,
    SPLIT,
    AgentClosedError,
    AgentMode,
    AgentStats,
    InferenceResult,
    InFlightLimitError,
    StageTimes,
)
from edge_agent.runtime import CutRuntime, RunnerCache, RuntimeOptions, prepare_inputs
from edge_agent.supervisor import Supervisor
from edge_agent.transport import CloudLink, LinkDown
from models.manifest import Bundle
from protos import serde
from protos.serde import CloudReply, CloudRequest

log = logging.getLogger("splitinfer.edge")

# Cloud status codes about one request's data: finish it here but keep the cloud.
PER_REQUEST_CODES = frozenset(
    serde.status_number(c)
    for c in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE)
)

LinkFactory = Callable[..., Any]


class _Request:
    """One request's state on its way through the agent."""

    __slots__ = (
        "id", "future", "rt", "inputs", "t_submit", "queue_ms", "head_ms", "encode_ms", "t_sent",
        "t_gave_up", "activation", "generation", "sent_bytes", "sent_unix_ns", "done",
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
        self.sent_unix_ns = 0  # the request's send stamp (wall clock): with the cloud's receive stamp, one way
        self.done = False


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
        self._model_sha256 = self.bundle.model_sha256  # with the cut, names the tail the cloud runs
        self._cache = RunnerCache(RuntimeOptions.from_config(config))
        self._runtimes: dict[str, CutRuntime] = {}
        self._rt = self._runtime(config.cut or self.bundle.chosen)
        # The codec each cut is sent with: the plan's (config codec "auto"), or the config's for every cut.
        self._codec_override = None if config.codec == C.DEFAULT_CODEC else config.codec
        self._codecs: dict[str, str] = {}
        if self._codec_override is not None and self.bundle.codec_for(self._rt.cut_id) not in (None,
                                                                                               self._codec_override):
            log.info("codec %s (config) overrides the plan's %s for cut %s", self._codec_override,
                     self.bundle.codec_for(self._rt.cut_id), self._rt.cut_id)
        self._on_result = on_result
        self._result_listeners: list[Callable[[InferenceResult], None]] = []
        self._state_listeners: list[Callable[[str, str], None]] = []
        self.bandwidth = BandwidthEstimator()
        self._lock = threading.RLock()
        # Built before any thread starts: it checks every plan-table cut loads.
        self.adaptive: AdaptiveCut | None = AdaptiveCut(self, config.adaptive) if config.adaptive.enabled else None
        self._changed = threading.Condition(self._lock)  # mode switches and finished requests
        self._stats = AgentStats(mode=LOCAL, cut=self._rt.cut_id)
        self._state = AgentMode()  # replaced (never changed) under self._lock; see _set_state
        self._pending: dict[str, _Request] = {}  # sent to the cloud, not finished
        self._unfinished = 0
        self._ids = itertools.count(1)
        self._slots = threading.BoundedSemaphore(config.max_in_flight)
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="splitinfer-edge")
        self._stopped = False
        self._link = link_factory(config, self._on_reply, self._on_broken)
        self._deadlines = DeadlineWatcher(self._on_deadline).start()
        self._supervisor = Supervisor(
            config, self._link, self.bandwidth, state=lambda: self._state, runtime=lambda: self._rt,
            switch=self._switch, still_local=self._still_local, count=self._count, next_id=lambda: next(self._ids),
            model_sha256=self._model_sha256, codec=self.codec_for,
        )
        failed_at_start = False
        if connect and self._rt.remote:
            ok, why = self._supervisor.try_split()
            if ok:
                self._switch(SPLIT, "connected")
            else:
                self._still_local(why)
                log.warning("cloud %s unavailable at start (%s); serving on the device", config.cloud, why)
                failed_at_start = True  # the first background attempt counts as a retry
        elif not self._rt.remote:
            self._still_local(f"cut {self._rt.cut_id} runs entirely on the device (nothing to send)")
        self._supervisor.start(failed_at_start)
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
    ) -> EdgeAgent:
        """An agent for the bundle at `path` talking to `cloud` ("host:port"); `fields` are AgentConfig keys."""
        cfg = AgentConfig.from_dict({"bundle": path, "cloud": cloud, **fields}, source="EdgeAgent.from_bundle")
        return cls(cfg, on_result=on_result, connect=connect)

    # -- public API -----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """SPLIT or LOCAL."""
        return self._state.mode

    @property
    def cut(self) -> str:
        """The cut new requests start on."""
        return self._rt.cut_id

    @property
    def codec(self) -> str:
        """The codec new requests are sent with (the current cut's)."""
        return self.codec_for(self._rt.cut_id)

    def codec_for(self, cut_id: str) -> str:
        """The codec `cut_id` is sent with: the config's when it names one, else the plan's for that cut (the
        plan-table row's it was switched to by, else the candidate's), else int8 (a plan without codecs)."""
        if self._codec_override is not None:
            return self._codec_override
        codec = self._codecs.get(cut_id)
        if codec is None:
            codec = self._codecs[cut_id] = self.bundle.codec_for(cut_id) or C.PLANLESS_CODEC
        return codec

    @property
    def forced_local(self) -> bool:
        """Whether set_mode('local') holds the agent on the device."""
        return self._state.forced_local

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

    def probe_link(self, cut_id: str, calibration: bool = False) -> bool:
        """Send one measurement probe carrying `cut_id`'s payload (it feeds `bandwidth`); whether it was answered.

        `calibration`: the payload in `calibration_codec` (another size), for the estimator's fixed-cost fit.
        Opens the link first only while the agent runs a cut that sends nothing (edge-only): for remote cuts
        reconnecting is the supervisor's job.
        """
        rt = self._runtime(cut_id)
        st = self._state
        if not rt.remote or st.closing or st.forced_local:
            return False
        with self._supervisor.open_lock:
            if self._link.generation is None:
                if self._rt.remote:
                    return False
                try:
                    self._link.open()
                except LinkDown as exc:
                    log.debug("measurement probe: cloud %s unreachable: %s", self.config.cloud, exc)
                    return False
        ok, _why = self._supervisor.probe(rt, calibration=calibration)
        return ok

    def infer(self, x: Any, timeout: float | None = None) -> InferenceResult:
        """Run one request to completion (cloud or edge) and return its result.

        The head runs on the calling thread, which waits anyway: one thread hand-over less than `submit`.
        """
        req = self._admit(x, block=True, timeout=None)
        self._run(req)
        return req.future.result(timeout)

    def start_here(self, x: Any, *, block: bool = True, timeout: float | None = None) -> Future[InferenceResult]:
        """`submit`, but the head runs on the calling thread (as in `infer`), which then gets the future: for a
        caller that waits anyway but must not lose track of the request when it stops waiting (the local API)."""
        req = self._admit(x, block=block, timeout=timeout)
        self._run(req)
        return req.future

    def submit(self, x: Any, *, block: bool = True, timeout: float | None = None) -> Future[InferenceResult]:
        """Start a request; waits (up to `timeout`) for one of max_in_flight slots, else InFlightLimitError."""
        req = self._admit(x, block=block, timeout=timeout)
        self._pool.submit(self._run, req)
        return req.future

    def _admit(self, x: Any, *, block: bool, timeout: float | None) -> _Request:
        """Check the input, take an in-flight slot and count the request; the caller then runs it."""
        rt = self._rt
        inputs = prepare_inputs(x, rt.inputs)
        if self._state.closing:
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
            if self._state.closing:
                self._slots.release()
                raise AgentClosedError("the agent is closed; make a new EdgeAgent")
            self._unfinished += 1
            self._stats.submitted += 1
        return req

    def stats(self) -> AgentStats:
        """A snapshot of the counters, the mode and the cut."""
        with self._lock:
            self._stats.mode = self._state.mode
            self._stats.cut = self._rt.cut_id
            self._stats.in_flight = self._unfinished
            self._stats.extra["mode_reason"] = self._state.reason
            return self._stats.snapshot()

    def set_cut(self, cut_id: str) -> None:
        """Start new requests on `cut_id`; requests in flight finish on the cut they started on. With codec
        "auto" the cut's codec comes with it: the plan-table row's for the current uplink estimate."""
        rt = self._runtime(cut_id)
        mbps = self.bandwidth.estimate().mbps
        codec = self.bundle.codec_for(cut_id, mbps) or C.PLANLESS_CODEC
        with self._lock:
            if self._codecs.get(cut_id) != codec:
                self._codecs[cut_id] = codec
                log.info("cut %s is sent with codec %s", cut_id, codec)
            changed = self._rt is not rt
            self._rt = rt
            self._stats.cut = cut_id
        st = self._state
        if rt.remote and st.mode == LOCAL and not st.forced_local:
            self._supervisor.wake()
        if changed:
            self._notify_state()

    def set_mode(self, mode: str) -> None:
        """"local": stay on the device until told otherwise; "split": go back to the cloud once probes pass."""
        if mode == LOCAL:
            self._set_state(forced_local=True)
            self._switch(LOCAL, "set_mode('local')")
        elif mode == SPLIT:
            self._set_state(forced_local=False)
            self._supervisor.resume()
        else:
            raise ValueError(f"mode: expected {SPLIT!r} or {LOCAL!r}, got {mode!r}")

    def reload_tls(self, config: AgentConfig) -> None:
        """Read `config`'s [tls] files now (ConfigError if one cannot be read) and use them from the next
        connection to the cloud on; the open stream keeps its channel (`split-agent serve` on SIGHUP)."""
        reload = getattr(self._link, "reload_credentials", None)  # a CloudLink (test links have no credentials)
        if reload is not None:
            reload(config)

    def wait_for_mode(self, mode: str, timeout: float) -> bool:
        """Block until the agent is in `mode` (True) or `timeout` seconds pass (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._state.mode == mode, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, let those in flight finish (the stragglers on the device), stop threads."""
        with self._lock:
            if self._state.closing and self._stopped:
                return
            self._set_state(closing=True)
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
        with self._lock:
            self._stopped = True
        self._supervisor.stop()
        self._deadlines.stop()
        self._link.close()
        self._supervisor.join(5.0)
        self._deadlines.join(5.0)
        self._pool.shutdown(wait=True)
        self._cache.close()  # LiteRT interpreters and onnxruntime sessions go now, not with their threads

    def __enter__(self) -> EdgeAgent:
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
            st = self._state
            if st.mode == LOCAL:
                self._finish_local(req, f"local mode: {st.reason}")
                return
            cfg = self.config
            msg = serde.prepare(CloudRequest(
                req.id, cfg.device_id, req.rt.model_name, req.rt.cut_id,
                serde.encode_tensors(req.activation, self.codec_for(req.rt.cut_id)), deadline_ms=cfg.deadline_ms,
                sent_unix_ns=time.time_ns(), model_sha256=self._model_sha256,
            ))
            size = serde.message_bytes(msg)
            if size > C.MAX_MESSAGE_BYTES:  # gRPC would end the whole stream over it: finish it here instead
                self._count_extra("oversize_requests")
                self._finish_local(req, f"request of about {size} bytes exceeds the {C.MAX_MESSAGE_BYTES}-byte "
                                        "message limit; finished on the device")
                return
            req.sent_bytes, req.sent_unix_ns = msg.tensors.wire_bytes, msg.sent_unix_ns
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
            self._deadlines.add(req.id, req.t_sent + self.config.deadline_ms / 1000.0)
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
        now = time.perf_counter()
        network_ms = max(0.0, _ms(req.t_sent, reply.received_at) - reply.cloud_ms)
        self.bandwidth.add(req.sent_bytes, network_ms, reply.received_at, sent_unix_ns=req.sent_unix_ns,
                           received_unix_ns=reply.received_unix_ns)
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
        if self._supervisor.on_reply(reply):
            return
        req = self._claim(reply.request_id)
        if req is None:
            with self._lock:
                self._stats.late_replies_dropped += 1
            return
        if reply.ok:
            first = next(iter(req.activation.values()), None)
            batch = int(first.shape[0]) if first is not None and first.ndim else None
            problem = req.rt.check_outputs(reply.outputs, batch)
            if problem is None:
                self._finish_cloud(req, reply)
                return
            self._count_extra("bad_replies")
            with self._lock:
                self._stats.cloud_errors += 1
            self._fallback(req, f"cloud reply rejected: {problem}")
            return
        with self._lock:
            self._stats.cloud_errors += 1
        reason = f"cloud error {serde.status_name(reply.code)}: {reply.message}"
        self._fallback(req, reason, switch=reply.code not in PER_REQUEST_CODES)

    def _on_broken(self, generation: int, reason: str) -> None:
        with self._lock:
            ids = [rid for rid, r in self._pending.items() if r.generation == generation]
        self._supervisor.on_broken(generation)
        claimed = [r for r in (self._claim(rid) for rid in ids) if r is not None]
        st = self._state
        if claimed or (st.mode == SPLIT and self._link.generation is None and not st.closing):
            self._switch(LOCAL, reason)
        for req in claimed:
            self._fallback(req, reason, switch=False)

    # -- deadlines ------------------------------------------------------------------------------

    def _on_deadline(self, request_id: str) -> None:
        """On the watcher's thread: a sent request's deadline passed; finish it on the device unless answered."""
        req = self._claim(request_id)  # None: it was answered in time
        if req is not None:
            with self._lock:
                self._stats.deadline_misses += 1
            self._fallback(req, f"deadline of {self.config.deadline_ms} ms exceeded")

    # -- mode and recovery ----------------------------------------------------------------------

    def _set_state(self, **changes: Any) -> AgentMode:
        """Replace the mode value (the one place it changes) and wake whoever waits on a mode."""
        with self._changed:
            self._state = dataclasses.replace(self._state, **changes)
            self._changed.notify_all()
            return self._state

    def _still_local(self, why: str) -> None:
        """Record why the agent stays LOCAL (a failed reconnect)."""
        self._set_state(reason=why)

    def _count(self, counter: str) -> None:
        """Add one to an AgentStats counter."""
        with self._lock:
            setattr(self._stats, counter, getattr(self._stats, counter) + 1)

    def _count_extra(self, counter: str) -> None:
        """Add one to a counter kept in AgentStats.extra."""
        with self._lock:
            self._stats.extra[counter] = self._stats.extra.get(counter, 0) + 1

    def _switch(self, mode: str, reason: str) -> None:
        with self._changed:
            st = self._state
            if mode == SPLIT and st.forced_local:
                return
            self._state = dataclasses.replace(st, reason=reason if mode == LOCAL else "")
            if st.mode == mode:
                return
            self._state = dataclasses.replace(self._state, mode=mode)
            self._stats.mode_switches += 1
            self._stats.mode = mode
            self._changed.notify_all()
        log.info("mode -> %s (%s)", mode, reason)
        if mode == LOCAL:
            self._supervisor.wake()
        self._notify_state()

    def _notify_state(self) -> None:
        mode, cut = self._state.mode, self._rt.cut_id
        for fn in self._state_listeners:
            try:
                fn(mode, cut)
            except Exception:  # a state hook must not take the agent down; logged with its traceback
                log.exception("state listener failed (mode %s, cut %s)", mode, cut)
