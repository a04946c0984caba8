"""Waiting on a condition with a deadline (never a bare sleep as a wait)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    """Poll `cond` until truthy and return its value; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
