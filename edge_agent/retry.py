"""Retry as an object: it decides by gRPC status code and spaces attempts with exponential backoff and jitter.

delay(attempt) = min(max_s, initial_s * multiplier**attempt); the wait is that delay with a `jitter` share
drawn at random: uniform(delay * (1 - jitter), delay). jitter = 1 is "full jitter" (uniform(0, delay)), which
spreads a fleet of agents that lost the same cloud at the same moment instead of having them reconnect in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

from edge_agent.config import BackoffConfig

# Codes that say "the cloud, or the path to it, is gone or overloaded for now": worth another attempt later.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter; `should_retry` decides by status code."""

    config: BackoffConfig = field(default_factory=BackoffConfig)
    retry_codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def should_retry(self, code: grpc.StatusCode | None) -> bool:
        """True for codes that may clear up by themselves (None: no status, e.g. a refused connection)."""
        return code is None or code in self.retry_codes

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before attempt `attempt` (0-based), capped at max_s."""
        cfg = self.config
        # Cap the exponent so a long outage does not overflow the float.
        return min(cfg.max_s, cfg.initial_s * cfg.multiplier ** min(attempt, 64))

    def delay(self, attempt: int) -> float:
        """The jittered wait before attempt `attempt`: uniform(ceiling * (1 - jitter), ceiling)."""
        top = self.ceiling(attempt)
        return top - self.config.jitter * top * self.rng.random()

    def next_delay(self) -> float:
        """The wait before the next attempt; each call counts one failed attempt."""
        wait = self.delay(self.attempt)
        self.attempt += 1
        return wait

    def delay_after(self, code: grpc.StatusCode | None) -> float:
        """The wait after a failure with `code`: backoff if it may clear up, else the longest wait (max_s)."""
        if self.should_retry(code):
            return self.next_delay()
        self.attempt += 1
        return self.config.max_s

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0
