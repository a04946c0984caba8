"""An asyncio event loop on a daemon thread, for the parts of the cloud node that run beside the gRPC tier."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class LoopThread:
    """Boot a coroutine on a fresh loop in its own thread, keep the loop running, shut it down on request."""

    def __init__(self, name: str):
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the loop thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, boot: Callable[[], Awaitable[Any]], timeout_s: float) -> None:
        """Run `boot()` on the new loop and return once it finished; its exception is re-raised here.

        Raises TimeoutError when boot takes longer than `timeout_s`.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(boot())
            except BaseException as exc:  # noqa: BLE001 - handed to start(), which re-raises it
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"{self.name} did not start within {timeout_s} s")
        if failure:
            self._thread = None
            raise failure[0]

    def stop(self, shutdown: Callable[[], Coroutine[Any, Any, Any]] | None, timeout_s: float) -> None:
        """Await `shutdown()` on the loop (a failure is logged, the loop still stops), stop the loop, join."""
        if self._thread is None or self.loop is None:
            return
        if shutdown is not None:
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout_s)
            except Exception as exc:  # noqa: BLE001 - still stop the loop; say why shutdown was unclean
                log.warning("%s: shutdown was not clean: %r", self.name, exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        self._thread = None
