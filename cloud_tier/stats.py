"""Counters of the gRPC tier (requests, probes, batches, batch sizes, errors by code, queue and in-flight gauges).

Read at scrape time by cloud_tier.metrics.ServerCollector for the dashboard's /metrics.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerStats:
    """Thread-safe counters; `snapshot()` returns a plain dict copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._batch_sizes: Counter[float] = Counter()  # bucket upper bound (inf: beyond the last) -> runs
        self.queued = 0  # requests waiting in batchers right now (gauge)
        self.in_flight = 0  # accepted requests not yet answered (gauge)

    def incr(self, name: str, n: int = 1) -> None:
        """Add `n` to counter `name` (requests, probes, batches, rows...)."""
        with self._lock:
            self._counts[name] += n

    def error(self, code: str) -> None:
        """Count one request answered with grpc status `code` (a StatusCode name)."""
        with self._lock:
            self._errors[code] += 1

    def batch(self, rows: int) -> None:
        """Count one tail run of `rows` rows, in the smallest bucket that holds it."""
        bucket = next((b for b in BATCH_SIZE_BUCKETS if rows <= b), float("inf"))
        with self._lock:
            self._counts["batches"] += 1
            self._counts["batched_rows"] += rows
            self._batch_sizes[bucket] += 1

    def gauge(self, name: str, delta: int) -> None:
        """Move gauge `name` (queued, in_flight) by `delta`."""
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, Any]:
        """A copy of every counter: counts, errors by code, batch size histogram, gauges."""
        with self._lock:
            return {
                **dict(self._counts),
                "errors": dict(self._errors),
                "batch_size_histogram": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                "queued": self.queued,
                "in_flight": self.in_flight,
            }
