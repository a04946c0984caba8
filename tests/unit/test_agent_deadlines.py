"""The agent's deadline watcher: each expired request id is reported once, earliest first."""

from __future__ import annotations

import threading
import time

from edge_agent.deadlines import DeadlineWatcher


def test_deadline_watcher_reports_each_expired_id_once():
    seen: list[str] = []
    done = threading.Event()

    def expired(rid: str) -> None:
        seen.append(rid)
        if len(seen) == 2:
            done.set()

    watcher = DeadlineWatcher(expired).start()
    now = time.perf_counter()
    watcher.add("late", now + 0.05)
    watcher.add("early", now + 0.01)
    assert done.wait(5.0)
    watcher.stop()
    watcher.join(5.0)
    assert not watcher._thread.is_alive()  # stop() ends the thread
    assert seen == ["early", "late"]
