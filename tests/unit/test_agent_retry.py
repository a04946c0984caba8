"""RetryPolicy: exponential growth, cap, jitter bounds and decisions by status code."""

from __future__ import annotations

import random

import grpc
import pytest

from edge_agent.config import BackoffConfig
from edge_agent.retry import RetryPolicy


def test_ceiling_grows_exponentially_and_is_capped():
    policy = RetryPolicy(BackoffConfig(initial_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.0))
    assert [round(policy.ceiling(a), 6) for a in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.ceiling(10_000) == 1.0  # no overflow after a long outage


def test_no_jitter_is_deterministic_and_reset_starts_over():
    policy = RetryPolicy(BackoffConfig(initial_s=0.1, max_s=10, multiplier=3.0, jitter=0.0))
    assert [round(policy.next_delay(), 6) for _ in range(3)] == [0.1, 0.3, 0.9]
    policy.reset()
    assert policy.next_delay() == pytest.approx(0.1)


@pytest.mark.parametrize("jitter", [1.0, 0.25])
def test_jittered_delays_stay_in_their_band_and_spread(jitter):
    policy = RetryPolicy(BackoffConfig(initial_s=0.5, max_s=4, multiplier=2, jitter=jitter), rng=random.Random(7))
    for attempt in range(8):
        top = policy.ceiling(attempt)
        samples = [policy.delay(attempt) for _ in range(500)]
        assert all(top * (1 - jitter) <= s <= top for s in samples)
        assert max(samples) - min(samples) > 0.5 * jitter * top  # actually spread over the band


def test_full_jitter_mean_is_half_the_ceiling():
    policy = RetryPolicy(BackoffConfig(initial_s=1.0, max_s=1.0, jitter=1.0), rng=random.Random(3))
    samples = [policy.delay(0) for _ in range(4000)]
    assert sum(samples) / len(samples) == pytest.approx(0.5, abs=0.03)


def test_decides_by_status_code():
    policy = RetryPolicy()
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert policy.should_retry(code)
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED):
        assert not policy.should_retry(code)
    assert policy.should_retry(None)  # no status at all: the connection was refused


def test_delay_after_waits_longest_for_codes_that_will_not_clear():
    policy = RetryPolicy(BackoffConfig(initial_s=0.1, max_s=3.0, jitter=0.0))
    assert policy.delay_after(grpc.StatusCode.UNAVAILABLE) == pytest.approx(0.1)
    assert policy.delay_after(grpc.StatusCode.NOT_FOUND) == 3.0
    assert policy.attempt == 2
