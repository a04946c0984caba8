"""The deadline watcher: one thread that reports each sent request whose reply is later than its deadline.

The gRPC sync response iterator has no timeout of its own (grpc#20562), so the agent keeps its deadlines here:
a heap of (due, request id), one thread that sleeps until the earliest is due, and a wake-up only when a new
deadline is earlier than the one it sleeps towards (most are later: no thread wake-up per request).
The watcher only reports (`on_expired(request_id)`, outside its lock); a request answered in time is simply
not found by the agent when its deadline comes.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["DeadlineWatcher"]

MAX_SLEEP_S = 1.0  # re-check at least this often, so that `stop()` is seen


class DeadlineWatcher:
    """Calls `on_expired(request_id)` on its own thread once each added deadline has passed."""

    def __init__(self, on_expired: Callable[[str], None], name: str = "splitinfer-deadlines"):
        self._on_expired = on_expired
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition(threading.Lock())
        self._watch_until = 0.0  # perf_counter time the thread sleeps until (0: not asleep)
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    def start(self) -> DeadlineWatcher:
        """Start the watcher thread."""
        self._thread.start()
        return self

    def add(self, request_id: str, due: float) -> None:
        """Report `request_id` once perf_counter() passes `due`."""
        with self._cv:
            heapq.heappush(self._heap, (due, next(self._seq), request_id))
            if due < self._watch_until:  # the watcher would sleep past it: wake it (else no thread wake-up)
                self._cv.notify()

    def stop(self) -> None:
        """Tell the thread to end; deadlines still queued are not reported (see `join`)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def join(self, timeout: float) -> None:
        """Wait (bounded) for the thread to end."""
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _watch(self) -> None:
        while True:
            expired: list[str] = []
            with self._cv:
                if self._stopped:
                    return
                now = time.perf_counter()
                while self._heap and self._heap[0][0] <= now:
                    expired.append(heapq.heappop(self._heap)[2])
                if not expired:
                    wait = min(self._heap[0][0] - now if self._heap else MAX_SLEEP_S, MAX_SLEEP_S)
                    self._watch_until = now + wait
                    self._cv.wait(wait)
                    self._watch_until = 0.0  # awake: a new deadline needs no wake-up call
                    continue
            for rid in expired:
                self._on_expired(rid)
