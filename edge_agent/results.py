"""What the agent hands back: one InferenceResult per request, and its counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SPLIT = "split"
LOCAL = "local"
CLOUD = "cloud"
EDGE = "edge"


class AgentError(RuntimeError):
    """Base of the agent's own errors."""


class InFlightLimitError(AgentError):
    """submit() found max_in_flight requests unfinished and could not wait for a slot."""


class AgentClosedError(AgentError):
    """The agent is closed (or closing) and takes no new requests."""


@dataclass(frozen=True)
class AgentMode:
    """Where new requests go, and why: replaced as a whole (under the agent's lock), never changed in place."""

    mode: str = LOCAL  # SPLIT or LOCAL
    reason: str = "not connected yet"  # why the agent is LOCAL ("" in SPLIT)
    forced_local: bool = False  # set_mode('local') holds the agent on the device
    closing: bool = False  # close() was called: no new requests, no reconnecting


@dataclass(frozen=True)
class StageTimes:
    """Where a request's time went, in milliseconds.

    queue_ms: submit -> an edge worker picks it up; head_ms: the head on the device; encode_ms: codec +
    request building; network_ms: the cloud round trip minus the cloud's own time (for a fallback: the time
    spent waiting before giving up); cloud_queue_ms: waiting for a batch in the cloud; tail_ms: the tail,
    in the cloud (its batch compute) or on the device; total_ms: submit -> result.
    """

    queue_ms: float = 0.0
    head_ms: float = 0.0
    encode_ms: float = 0.0
    network_ms: float = 0.0
    cloud_queue_ms: float = 0.0
    tail_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Plain dict of the stages."""
        return asdict(self)


@dataclass(frozen=True)
class InferenceResult:
    """The outcome of one request: outputs, who served it, on which cut, the timing and any fallback reason."""

    request_id: str
    outputs: dict[str, np.ndarray]
    served_by: str  # CLOUD or EDGE
    cut: str
    timing: StageTimes
    fallback_reason: str | None = None  # why a request meant for the cloud finished on the device
    batch_size: int = 0  # the cloud batch it ran in; 0 when served on the edge
    sent_bytes: int = 0  # tensor payload bytes sent to the cloud

    @property
    def output(self) -> np.ndarray:
        """The first (for most models the only) output."""
        return next(iter(self.outputs.values()))


@dataclass
class AgentStats:
    """Counters since the agent started; `snapshot()` copies them."""

    submitted: int = 0
    refused: int = 0  # submit() found no free in-flight slot
    sent: int = 0  # requests put on the stream (probes not included)
    served_cloud: int = 0
    served_edge: int = 0
    failed: int = 0  # finished with an exception (e.g. the model failed on the device)
    fallbacks: int = 0  # sent to the cloud but finished on the device
    deadline_misses: int = 0
    cloud_errors: int = 0  # replies with a non-OK status
    late_replies_dropped: int = 0  # replies for requests already finished on the device
    mode_switches: int = 0
    reconnects: int = 0
    probes_sent: int = 0
    probes_failed: int = 0
    callback_errors: int = 0
    duplicate_finishes: int = 0  # a request finished twice: must stay 0
    mode: str = LOCAL
    cut: str = ""
    in_flight: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def snapshot(self) -> AgentStats:
        """A copy safe to read while the agent goes on."""
        return AgentStats(**{**asdict(self), "extra": dict(self.extra)})

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-friendly)."""
        return asdict(self)
