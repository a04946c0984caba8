"""Uplink bandwidth and RTT measured from the agent's own traffic, and the adaptive cut chosen from them.

Samples: every cloud-served request (and every probe) gives (payload bytes, network ms = round trip minus the
cloud's own time, receive time). Round trips of tiny messages (the gRPC health check) give the RTT.

A request costs more than its bytes on the link: gRPC framing, protobuf serialization, the cloud's decode
and scheduling outside its reported time. On a fast link that fixed cost is larger than the transfer itself
(12 KB at 100 Mbit/s is 1 ms on the link, the fixed cost ~1.5 ms on this host), and a health check does not
pay it. So the fixed cost is learned from requests of two sizes: `network_ms = fixed + bytes / rate`, a line
whose intercept is the fixed cost and whose slope is 1 / rate. Calibration probes (`calibration=True`) carry
the same cut's payload in another codec (int8 <-> fp32: a quarter or four times the bytes, same cloud work);
they feed the fit, not the rate samples.

    fit       = per size class (bit length of bytes), the fastest of its last `fit_window` samples no older
                than `max_age_s` (queueing and jitter only add time: the lower envelope is the link); the line
                through the envelope points of the smallest and the largest class, if they differ >= 2x in bytes
    fixed_ms  = max(RTT, intercept of the fit clamped to [0, the small point's ms])
                RTT = min over the last `rtt_window` health checks; without a fit fixed_ms is the RTT alone,
                and without either 0 (the estimate is then a lower bound, which errs toward the smaller payload)
    transfer  = network_ms - fixed_ms                   for a request that had the link to itself
              = min(that, t_done - t_done_previous)     for one sent while the previous was still on the
                                                        link: the uplink is FIFO, so when requests queue,
                                                        the spacing of their replies is the link time
    sample    = 8 * bytes / transfer                    (Mbit/s; transfer floored at 5% of network_ms)
    estimate  = median of the last `window` rate samples no older than `max_age_s`; `upper_mbps` = their 75th
                percentile (nearest rank), which the cut policy decides by

One way, where the reply carries the cloud's receive stamp (`received_unix_ns`) and the request the device's send
stamp (`sent_unix_ns`): each sample also has one_way_ms = received - sent, and when two sizes of those give a fit,
the transfer is the smaller of the round trip's and `one_way_ms - intercept` (or, for a queued request, the
spacing of the cloud's receive stamps): each is the link time plus delays of its own kind. The reason: on a
device short of CPU (a cgroup quota, a busy Pi) the thread that receives the reply is often stalled, and a round
trip counts that stall as link time, as it counts the downlink and the reply's decoding; the one-way time holds
none of these. The two stamps are on two clocks (one on a single
host, not in the field): the intercept of the one-way fit holds their offset, and a transfer is a difference of
two one-way times, so a constant offset cancels and is never needed (the intercept is therefore not clamped at 0).
A clock step (NTP) skews the one-way figures until the samples before it age out (`max_age_s`, `fit_window`).
The device's send-side stalls (its quota spent when it hands the request to gRPC) stay in: the cloud cannot stamp
the first byte's arrival (gRPC hands it the whole message), so the upper quantile below still matters.

When the larger size took no longer than the smaller, the link time is below the jitter: the fixed cost is
then the larger's time. `add` is O(1) (two bounded deques); `estimate` is O(window + 64 * fit_window). Only
payload bytes are counted: per-byte costs off the link (serialization, TLS, the cloud's decode) land in the
slope, so the estimate still errs low where they rival the link time. Through the lab's link proxy on this
2-core host (tests/integration/test_bandwidth_estimate.py, 128 KB requests, 2 KB probes) it read 2.0, 5.0,
17, 37, 64, 134 and 256 Mbit/s at 2, 5, 20, 50, 100, 200 and 500 (the proxy itself tops out near 300).

Why the policy reads the 75th percentile, not the median: delays off the link only ever add time (a device
whose CPU quota stalls the thread that receives the reply, the cloud's scheduling), and on an emulated
jetson-nano they hit most requests, so at 20 Mbit/s the median read below the split's plan-table row and the
agent left a split the link could carry (issue 18's adaptive run). The upper quantile is the lower envelope of
the times: a drop shows once 8 of 10 samples are slow (4 s at 2 requests/s), a recovery once 3 are fast.

Adaptive cut (`CutPolicy`): the plan table maps uplink Mbit/s to the best cut at that rate; a row's band starts
where its cut's predicted latency crosses the row below's (`band_edges`, from the plan's candidates), not at the
row's rate. The policy moves to a row above the current one only if the estimate (`upper_mbps`) divided by
`hysteresis` still reaches that row's band, and below only if the estimate multiplied by `hysteresis` still stays
below the current row's band; a cut is held at least `min_dwell_s`, and nothing is decided with fewer than
`min_samples` samples. So a constant rate never flaps, a rate near a band edge changes nothing, and a link back at
a row's rate returns to its cut (with the row's rate as the edge, a cut whose row is at 20 Mbit/s was re-entered
only at 25).

While the agent runs an edge-only cut it sends nothing and so measures nothing: `AdaptiveCut` then sends one
measurement probe every `probe_interval_s`, carrying the payload of the plan table's remote cut with the largest
payload within `probe_budget_kb_per_min * probe_interval_s / 60` (34 KB at the defaults; the smallest when none
fits), and keeps the last estimate between probes: a small payload's transfer is below the jitter of the fixed cost,
so it reads a fast link as slow and the agent never came back to a split. Every `calibration_interval_s` it also
sends one calibration probe (on the current cut when it is remote, else on that probe cut) to keep the fixed-cost
fit current. Calibration probes stay within `probe_budget_kb_per_min` of payload in any 60 s (one that would exceed
it waits): on a remote cut they share the uplink with the requests, and on a 2 Mbit/s uplink a 100 KB fp32 payload
every 5 s would hold it 8% of the time. Measurement probes are sized by the budget but not counted in it: they are
sent only while the cut sends nothing, and they are how the agent sees the link come back. While the cloud is
unreachable (LOCAL mode not by choice) it does not probe: the agent's supervisor is reconnecting and its probes
feed the same estimator. A cloud override (`pin`) suspends switching until `resume`.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from edge_agent.config import AdaptiveConfig

__all__ = [
    "AdaptiveCut", "BandwidthEstimator", "CutPolicy", "Estimate", "band_edges", "calibration_codec", "plan_costs",
]

log = logging.getLogger("splitinfer.edge.adaptive")

_MIN_SPACING_MS = 0.05  # replies closer than this came out of one cloud batch: they say nothing about the link
_TRANSFER_FLOOR = 0.05  # a transfer is at least this share of network_ms (the RTT estimate may be too high)
_FIT_RATIO = 2.0  # the fit needs sizes at least this far apart (bytes ratio)
_UPPER_Q = 0.75  # the policy's rate: this quantile of the rate samples (the lower envelope of their times)
_ITEMSIZE = {"int64": 8, "uint64": 8, "int32": 4, "uint32": 4, "int16": 2, "uint16": 2, "int8": 1, "uint8": 1,
             "bool": 1}  # a non-float tensor travels as itself


def calibration_codec(codec_spec: str) -> str:
    """The codec of a calibration probe for an agent sending `codec_spec`: int8 <-> fp32 (4x the bytes or a
    quarter), uncompressed so that the size ratio is known; same tensors, same cloud work."""
    base = codec_spec.split("+", 1)[0].strip().lower()
    return "fp32" if base in ("int8", "int8c") else "int8"


@dataclass(frozen=True)
class Estimate:
    """The current uplink estimate: Mbit/s (the median; None until measured), RTT in ms, the samples behind it,
    and `upper_mbps`, the `_UPPER_Q` quantile of the same samples, which CutPolicy decides by (None: use mbps)."""

    mbps: float | None
    rtt_ms: float | None
    samples: int
    upper_mbps: float | None = None


class _Sample(NamedTuple):
    """One cloud round trip as the estimator keeps it (ordered by `t_done`)."""

    t_done: float  # the agent's perf_counter when the reply arrived
    nbytes: int  # payload bytes sent
    network_ms: float  # round trip less the cloud's own time
    one_way_ms: float  # the cloud's receive stamp less the device's send stamp (two clocks); nan when unknown
    cloud_t: float  # the cloud's receive stamp, s (its wall clock)


class BandwidthEstimator:
    """Windowed-median uplink estimate from (bytes, network ms) samples, with the fixed per-request cost learned
    from samples of two sizes (see the module docstring); `add` is O(1) for the hot path."""

    def __init__(self, window: int = 10, max_age_s: float = 60.0, rtt_window: int = 16, fit_window: int = 8) -> None:
        """Keep the last `window` rate samples and `fit_window` per size class (no older than `max_age_s`), and
        `rtt_window` RTT measurements."""
        if window < 1 or rtt_window < 1 or fit_window < 1 or max_age_s <= 0:
            raise ValueError("window, rtt_window and fit_window must be >= 1 and max_age_s > 0")
        self.max_age_s = max_age_s
        self._fit_window = fit_window
        self._lock = threading.Lock()
        # one extra kept so the oldest sample has a predecessor
        self._samples: collections.deque[_Sample] = collections.deque(maxlen=window + 1)
        self._rtts: collections.deque[tuple[float, float]] = collections.deque(maxlen=rtt_window)
        # size class (bit length of bytes: at most 64 of them) -> its last samples
        self._sizes: dict[int, collections.deque[_Sample]] = {}
        self.total_samples = 0

    def add(self, sent_bytes: int, network_ms: float, t_done: float | None = None, *,
            calibration: bool = False, sent_unix_ns: int = 0, received_unix_ns: int = 0) -> None:
        """One cloud round trip: payload bytes, network ms (cloud time excluded), receive time (perf_counter).

        `calibration`: a probe of another size, for the fixed-cost fit only (not a rate sample).
        `sent_unix_ns` / `received_unix_ns`: the request's send stamp (device wall clock) and the cloud's receive
        stamp (its wall clock), when both are known (0: not known); the sample then also has a one-way time.
        """
        if sent_bytes <= 0 or not network_ms >= 0:
            return  # nothing sent (edge result) or a bogus time: not a sample
        t = time.perf_counter() if t_done is None else t_done
        one_way = (received_unix_ns - sent_unix_ns) / 1e6 if sent_unix_ns > 0 and received_unix_ns > 0 else math.nan
        sample = _Sample(t, int(sent_bytes), float(network_ms), one_way, received_unix_ns / 1e9)
        with self._lock:
            size_class = self._sizes.get(sample.nbytes.bit_length())
            if size_class is None:
                size_class = self._sizes[sample.nbytes.bit_length()] = collections.deque(maxlen=self._fit_window)
            size_class.append(sample)
            if not calibration:
                self._samples.append(sample)
                self.total_samples += 1

    def add_rtt(self, rtt_ms: float, t: float | None = None) -> None:
        """The round trip of a tiny message (a health check), in ms."""
        if not rtt_ms >= 0:
            return
        with self._lock:
            self._rtts.append((time.perf_counter() if t is None else t, float(rtt_ms)))

    def rtt_ms(self, now: float | None = None) -> float | None:
        """Minimum recent tiny-message round trip, or None when there is none."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            recent = [r for t, r in self._rtts if now - t <= self.max_age_s]
        return min(recent) if recent else None

    def fit(self, now: float | None = None, *, one_way: bool = False) -> tuple[float, float] | None:
        """(intercept ms, Mbit/s) of the line through the lower envelope of two size classes, or None without
        recent samples of sizes >= 2x apart. When the larger took no longer, the link time is below the jitter:
        the fixed cost is the smaller time and the rate reads infinite.

        `one_way`: fit the one-way times (samples that have them) instead of the round trips. Their intercept
        holds the offset between the device's and the cloud's clocks, so it is not clamped at 0 (only to the
        small point's time); a transfer is a difference of two one-way times, which cancels that offset.
        """
        now = time.perf_counter() if now is None else now
        with self._lock:
            classes = [list(d) for d in self._sizes.values()]
        points = []
        for samples in classes:
            recent = [(s.one_way_ms if one_way else s.network_ms, s.nbytes) for s in samples
                      if now - s.t_done <= self.max_age_s and not (one_way and math.isnan(s.one_way_ms))]
            if recent:
                ms, b = min(recent)
                points.append((b, ms))
        if len(points) < 2:
            return None
        (b_s, ms_s), (b_l, ms_l) = min(points), max(points)
        if b_l < _FIT_RATIO * b_s:
            return None
        if ms_l <= ms_s:
            return ms_l, float("inf")
        slope = (ms_l - ms_s) / (b_l - b_s)  # ms per byte
        intercept = min(ms_s - slope * b_s, ms_s) if one_way else min(max(ms_s - slope * b_s, 0.0), ms_s)
        return intercept, 8.0 / (slope * 1000.0)

    def fixed_ms(self, now: float | None = None) -> float | None:
        """The fixed per-request cost subtracted from every round trip: max(RTT, fitted intercept); None if
        neither."""
        now = time.perf_counter() if now is None else now
        rtt, line = self.rtt_ms(now), self.fit(now)
        parts = [v for v in (rtt, None if line is None else line[0]) if v is not None]
        return max(parts) if parts else None

    def estimate(self, now: float | None = None) -> Estimate:
        """Median uplink Mbit/s over the window (see the module docstring for the formula)."""
        now = time.perf_counter() if now is None else now
        rtt = self.rtt_ms(now)
        fixed = self.fixed_ms(now) or 0.0
        line = self.fit(now, one_way=True)
        fixed_one_way = None if line is None else line[0]
        with self._lock:
            samples = sorted(self._samples)
        values: list[float] = []
        prev: _Sample | None = None
        for i, s in enumerate(samples):
            before, prev = prev, s
            if i == 0 and len(samples) == self._samples.maxlen:
                continue  # kept only as the predecessor of the next one
            if now - s.t_done > self.max_age_s:
                continue
            transfer = s.network_ms - fixed
            spacing_ms = None if before is None else (s.t_done - before.t_done) * 1000.0
            if spacing_ms is not None and spacing_ms < s.network_ms:  # sent while the previous one was on the link
                if spacing_ms < _MIN_SPACING_MS:
                    continue
                transfer = min(transfer, spacing_ms)
            if fixed_one_way is not None and not math.isnan(s.one_way_ms):
                # One way: the device's send stamp to the cloud's receive stamp, less its fixed part; for a queued
                # request, the spacing of the cloud's receive stamps (one clock). Each of the two transfers is the
                # link time plus delays of its own (the device's reply-side stalls; the error of a fit's
                # intercept), so the smaller is the better bound.
                one_way = s.one_way_ms - fixed_one_way
                if before is not None and not math.isnan(before.one_way_ms):
                    cloud_spacing_ms = (s.cloud_t - before.cloud_t) * 1000.0
                    if _MIN_SPACING_MS <= cloud_spacing_ms < s.network_ms:
                        one_way = min(one_way, cloud_spacing_ms)
                transfer = min(transfer, one_way)
            transfer = max(transfer, _TRANSFER_FLOOR * s.network_ms, 1e-3)
            values.append(s.nbytes * 8.0 / (transfer * 1000.0))
        if not values:
            return Estimate(None, rtt, 0)
        values.sort()
        upper = values[max(0, math.ceil(_UPPER_Q * len(values)) - 1)]
        return Estimate(statistics.median(values), rtt, len(values), upper)

    def clear(self) -> None:
        """Forget every sample (e.g. when the link changed)."""
        with self._lock:
            self._samples.clear()
            self._rtts.clear()
            self._sizes.clear()


def band_edges(rows: Sequence[tuple[float, str]],
               cost: Callable[[str], tuple[float, float] | None] | None = None) -> list[float]:
    """The uplink Mbit/s at which each plan-table row's band starts, for `rows` sorted by Mbit/s.

    A row says which cut is best AT its rate; where the cut changes between two rows, the change happens somewhere
    between their rates, not at the upper one. Taking the upper row's rate as the edge puts the hysteresis band
    entirely above it: with rows 10 -> c038 and 20 -> c021 and hysteresis 1.25, an agent that left c021 came back
    only at 25 Mbit/s, so a link back at 20 never returned to it. With `cost(cut)` = (fixed ms, payload bytes),
    the edge is where the two cuts' predicted latencies, `fixed + 8 * bytes / rate` each, cross:
    rate* = 8 * (bytes_B - bytes_A) / (1000 * (fixed_A - fixed_B)), clamped to the two rows' rates; where they
    do not cross (or a cost is missing), the rows' geometric mean. Without `cost` (a bare table), the rows' rates.
    """
    edges = [rows[0][0]] if rows else []
    for (lo, a), (hi, b) in zip(rows, rows[1:]):
        edge = hi
        if cost is not None and a != b:
            ca, cb = cost(a), cost(b)
            edge = math.sqrt(lo * hi) if lo > 0 else hi
            if ca is not None and cb is not None and cb[1] > ca[1] and ca[0] > cb[0]:
                edge = min(max(8.0 * (cb[1] - ca[1]) / (1000.0 * (ca[0] - cb[0])), lo), hi)
        edges.append(edge)
    return edges


def plan_costs(bundle: Any) -> Callable[[str], tuple[float, float] | None] | None:
    """`cost(cut)` for band_edges from a bundle's plan: (its total_ms less its payload's time on the plan's
    uplink, its payload bytes), None for a cut the plan does not cost; None when the plan names no uplink."""
    plan = getattr(bundle, "plan", None)
    try:
        uplink = float(plan["network"]["uplink_mbps"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    if not uplink > 0:
        return None

    def cost(cut: str) -> tuple[float, float] | None:
        try:
            c = bundle.candidate(cut)
            nbytes = float(c["transfer_bytes"])
            fixed = float(c["total_ms"]) - 8.0 * nbytes / (1000.0 * uplink)
        except Exception:  # noqa: BLE001 - a cut the plan does not cost: the geometric mean for its edges
            return None
        return (fixed, nbytes) if math.isfinite(fixed) else None

    return cost


class CutPolicy:
    """Plan-table lookup with hysteresis and a minimum dwell; pure logic, the clock is passed in."""

    def __init__(
        self,
        plan_table: Sequence[tuple[float, str]],
        current: str,
        *,
        hysteresis: float = 1.25,
        min_dwell_s: float = 5.0,
        min_samples: int = 5,
        now: float = 0.0,
        cost: Callable[[str], tuple[float, float] | None] | None = None,
    ) -> None:
        """`plan_table`: (uplink Mbit/s, cut) rows; `current`: the cut the agent runs now; `cost`: each cut's
        (fixed ms, payload bytes) for the band edges (see band_edges)."""
        if not plan_table:
            raise ValueError("plan_table: expected at least one (uplink_mbps, cut) row")
        if hysteresis < 1.0:
            raise ValueError(f"hysteresis: expected a ratio >= 1, got {hysteresis}")
        self.rows = tuple(sorted((float(m), str(c)) for m, c in plan_table))
        self._bounds = band_edges(self.rows, cost)
        self.hysteresis = hysteresis
        self.min_dwell_s = min_dwell_s
        self.min_samples = min_samples
        self.current = current
        self.since = now
        self._row = self._row_of(current)

    @property
    def edges(self) -> tuple[float, ...]:
        """The uplink Mbit/s at which each row's band starts (see band_edges)."""
        return tuple(self._bounds)

    def row_for(self, mbps: float) -> int:
        """Index of the plan-table row whose band holds `mbps`."""
        return max(0, bisect.bisect_right(self._bounds, mbps) - 1)

    def _row_of(self, cut: str) -> int | None:
        return next((i for i, (_, c) in enumerate(self.rows) if c == cut), None)

    def moved_to(self, cut: str, now: float) -> None:
        """Record that the agent now runs `cut` (whoever switched it); the dwell starts again."""
        self.current, self.since, self._row = cut, now, self._row_of(cut)

    def decide(self, est: Estimate, now: float) -> str | None:
        """The cut to switch to now, or None to stay; decided by `est.upper_mbps` when it is set, else `est.mbps`."""
        mbps = est.mbps if est.upper_mbps is None else est.upper_mbps
        if mbps is None or est.samples < self.min_samples or now - self.since < self.min_dwell_s:
            return None
        if self._row is None:  # running a cut the table does not list: take the table's choice
            target = self.row_for(mbps)
        else:
            up, down = self.row_for(mbps / self.hysteresis), self.row_for(mbps * self.hysteresis)
            if up > self._row:
                target = up
            elif down < self._row:
                target = down
            else:
                return None
        cut = self.rows[target][1]
        if cut == self.current:
            self._row = target  # the same cut in another row of the table: nothing to switch
            return None
        return cut


class _Agent(Protocol):
    """What AdaptiveCut needs of an EdgeAgent."""

    bundle: Any
    bandwidth: BandwidthEstimator

    @property
    def cut(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def forced_local(self) -> bool: ...
    def set_cut(self, cut_id: str) -> None: ...
    def is_remote(self, cut_id: str) -> bool: ...
    def probe_link(self, cut_id: str, calibration: bool = False) -> bool: ...
    def measure_rtt(self) -> float | None: ...


class AdaptiveCut:
    """A background thread that switches the agent's cut by the measured uplink (see the module docstring)."""

    def __init__(self, agent: _Agent, config: AdaptiveConfig) -> None:
        """Follow `agent`'s estimator and bundle plan table; start() begins switching."""
        self.agent = agent
        self.config = config
        self.policy = CutPolicy(
            agent.bundle.plan_table, agent.cut, hysteresis=config.hysteresis, min_dwell_s=config.min_dwell_s,
            min_samples=config.min_samples, now=time.monotonic(), cost=plan_costs(agent.bundle),
        )
        self._probe_cut = self.measurement_cut([c for _, c in self.policy.rows if agent.is_remote(c)])
        self._lock = threading.Lock()  # one decision or override at a time
        self._pinned = False
        self._stop = threading.Event()
        self._last_probe = self._last_rtt = self._last_calibration = float("-inf")
        self._probe_log: collections.deque[tuple[float, int]] = collections.deque()  # (sent at, payload bytes)
        self.switches = 0
        self.probes = 0
        self.calibrations = 0
        self.probes_over_budget = 0
        self._warned_sizes: set[int] = set()  # calibration probe sizes over the whole budget, already logged
        self._thread = threading.Thread(target=self._loop, name="splitinfer-adaptive", daemon=True)

    @property
    def pinned(self) -> bool:
        """Whether a cloud override holds the cut (switching suspended)."""
        return self._pinned

    def probe_bytes(self, cut_id: str, calibration: bool = False) -> int:
        """The payload bytes of a probe on `cut_id` (uncompressed: an upper bound), in the agent's codec or, for a
        calibration probe, in `calibration_codec`."""
        spec = getattr(getattr(self.agent, "config", None), "codec", "int8")
        codec = (calibration_codec(spec) if calibration else str(spec)).split("+", 1)[0].strip().lower()
        width = {"fp32": 4, "fp16": 2}.get(codec, 1)
        try:
            tensors = self.agent.bundle.cut(cut_id).tensors
        except Exception:  # noqa: BLE001 - an agent double without a bundle: count nothing
            return 0
        total = 0
        for t in tensors:
            n = 1
            for d in t.concrete_shape(1):
                n *= d
            dtype = str(getattr(t, "dtype", "float32"))
            total += n * (width if dtype.startswith("float") else _ITEMSIZE.get(dtype, 4))
        return total

    def measurement_cut(self, remote: Sequence[str]) -> str | None:
        """The remote cut whose payload the edge-only measurement probes carry: the largest within
        `probe_budget_kb_per_min * probe_interval_s / 60` (the smallest when none fits; the largest when there is
        no budget), the first of the table on a tie. A small payload cannot measure a fast link: its transfer is
        below the jitter of the fixed cost, so it reads low and the agent would never come back to a split."""
        if not remote:
            return None
        sizes = {c: self.probe_bytes(c) for c in remote}
        cap = self.config.probe_budget_kb_per_min * 1024.0 * self.config.probe_interval_s / 60.0
        fitting = [c for c in remote if cap <= 0 or sizes[c] <= cap]
        if not fitting:
            return min(remote, key=lambda c: sizes[c])
        return max(fitting, key=lambda c: sizes[c])

    def within_budget(self, nbytes: int, now: float) -> bool:
        """Whether a calibration probe of `nbytes` keeps their payload in the last 60 s within the budget; if so
        it is counted as sent."""
        budget = self.config.probe_budget_kb_per_min * 1024.0
        log_ = self._probe_log
        while log_ and now - log_[0][0] >= 60.0:
            log_.popleft()
        if budget > 0 and sum(b for _, b in log_) + nbytes > budget:
            self.probes_over_budget += 1
            if nbytes > budget and nbytes not in self._warned_sizes:  # it can never go: say so, once
                self._warned_sizes.add(nbytes)
                log.warning("adaptive cut: a calibration probe of %.0f KB exceeds probe_budget_kb_per_min (%g KB) "
                            "on its own, so it is never sent and the fixed per-request cost is not learned; "
                            "raise the budget, or set calibration_interval_s = 0", nbytes / 1024.0,
                            self.config.probe_budget_kb_per_min)
            return False
        log_.append((now, nbytes))
        return True

    def start(self) -> AdaptiveCut:
        """Start the decision thread."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the decision thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def pin(self, cut_id: str) -> None:
        """Run `cut_id` and suspend adaptive switching until resume()."""
        with self._lock:
            self._pinned = True
            self.agent.set_cut(cut_id)
            self.policy.moved_to(cut_id, time.monotonic())

    def resume(self) -> None:
        """Let the estimate choose the cut again (a decision may follow at once: the dwell is waived)."""
        with self._lock:
            self._pinned = False
            self.policy.moved_to(self.agent.cut, time.monotonic() - self.config.min_dwell_s)

    def tick(self) -> str | None:
        """Measure if due, then decide and maybe switch; the cut switched to, or None."""
        now = time.monotonic()
        agent = self.agent
        if self._pinned or agent.forced_local:
            return None
        if now - self._last_rtt >= self.config.probe_interval_s:
            self._last_rtt = now
            agent.measure_rtt()
        remote = agent.is_remote(agent.cut)
        if not remote and self._probe_cut is not None and now - self._last_probe >= self.config.probe_interval_s:
            self._last_probe = now
            self.probes += 1
            agent.probe_link(self._probe_cut)
        calibrate_on = agent.cut if remote else self._probe_cut
        interval = self.config.calibration_interval_s
        if calibrate_on is not None and interval > 0 and now - self._last_calibration >= interval \
                and self.within_budget(self.probe_bytes(calibrate_on, calibration=True), now):
            self._last_calibration = now
            self.calibrations += 1
            agent.probe_link(calibrate_on, calibration=True)
        est = agent.bandwidth.estimate()
        with self._lock:
            if self._pinned:
                return None
            if self.policy.current != agent.cut:  # someone else switched it
                self.policy.moved_to(agent.cut, now)
            cut = self.policy.decide(est, now)
            if cut is None:
                return None
            log.info("adaptive cut: %s -> %s (uplink ~%.3f Mbit/s, median %.3f, rtt %s ms, %d samples)",
                     self.policy.current, cut, est.upper_mbps, est.mbps,
                     None if est.rtt_ms is None else round(est.rtt_ms, 2), est.samples)
            agent.set_cut(cut)
            self.policy.moved_to(cut, now)
            self.switches += 1
            return cut

    def _loop(self) -> None:
        period = min(0.5, self.config.probe_interval_s, max(0.05, self.config.min_dwell_s / 4))
        while not self._stop.wait(period):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a failed measurement must not end adaptivity; logged with cause
                log.exception("adaptive cut: tick failed")
