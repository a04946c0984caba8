"""A minimal Chrome DevTools Protocol driver for headless Chromium (test helper, not a test module)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def chromium_path() -> str | None:
    """The chromium binary, or None when it is not installed."""
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """Headless Chromium with remote debugging on a port it chose (read from its stderr)."""

    def __init__(self, profile_dir: Path, *, width: int = 1400, height: int = 900, timeout_s: float = 30.0):
        binary = chromium_path()
        if binary is None:
            raise FileNotFoundError("chromium not found (apt-get install chromium)")
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.browser_ws = self._read_ws_url(timeout_s)
        self.http = "http://" + self.browser_ws.split("/")[2]

    def _read_ws_url(self, timeout_s: float) -> str:
        found: list[str] = []
        seen: list[str] = []
        done = threading.Event()

        def drain() -> None:  # keep reading stderr for the browser's lifetime so it never blocks on a full pipe
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace")
                if not done.is_set():
                    seen.append(line)
                    m = _LISTENING.search(line)
                    if m:
                        found.append(m.group(1))
                        done.set()
            done.set()

        threading.Thread(target=drain, name="chromium-stderr", daemon=True).start()
        if not done.wait(timeout_s) or not found:
            self.close()
            raise RuntimeError(f"chromium did not report a DevTools endpoint within {timeout_s} s: "
                               f"{''.join(seen)[-2000:]}")
        return found[0]

    def page_ws_url(self, timeout_s: float = 10.0) -> str:
        """The DevTools websocket of the first page target."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.http}/json/list", timeout=5) as resp:
                pages = [t for t in json.load(resp) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.05)
        raise RuntimeError(f"chromium at {self.http} has no page target")

    def close(self) -> None:
        """Terminate the browser."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Page:
    """One page over the DevTools websocket: send commands, collect events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
            elif "method" in data:
                self.events.append(data)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("DevTools websocket closed"))

    async def send(self, method: str, timeout_s: float = 15.0, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (raise on a protocol error)."""
        self._next += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        await self.ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, timeout_s)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
        return reply["result"]

    async def eval(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its JSON value."""
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page raised evaluating {expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout_s: float = 20.0) -> Any:
        """Poll a JavaScript expression until it is truthy; fail naming `what` at the deadline."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what} ({expression})")

    async def close(self) -> None:
        """Close the websocket and stop reading."""
        await self.ws.close()
        self._reader.cancel()
