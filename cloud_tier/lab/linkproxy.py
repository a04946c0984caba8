"""LinkProxy: a TCP proxy that emulates a network link (rate, delay, jitter, loss, outages) on loopback.

`tc netem` needs privileges we do not have, so benchmarks, tests and `split-demo` put this proxy between an
agent and the cloud. It runs an asyncio loop on its own thread; `start()` returns the port it listens on.

The link model, per direction (uplink = client -> target, downlink = target -> client):
- rate: a token bucket shared by every connection of that direction (one link per proxy); a chunk of n
  bytes leaves the bottleneck when the bucket has paid for it, so a transfer of S bytes takes at least
  (S - burst_bytes) / rate. The reader waits for that before reading more, which pushes back on the sender.
- delay: each chunk is delivered `delay_ms` (+- `jitter_ms`, uniform) after it left the bottleneck; the
  delivery times of a connection never go backwards, so jitter never reorders bytes.
- loss, as TCP sees it: a lost segment is retransmitted after a timeout and holds back what follows it, so
  with probability `loss` a chunk is delivered `rto_ms` late (no bytes are ever dropped or corrupted).
- outages: `blackhole(True)` stops forwarding without closing anything (data waits, connections stay open,
  new ones are accepted but not connected upstream until it ends); `reset_all()` closes every connection
  with a TCP RST.

Bounds and what it refuses: at most `max_connections` connections at once (a connection beyond that is
closed right after accept and counted as refused); at most `max_buffer_bytes` held per direction per
connection (counted in chunks of up to 64 KiB; when full the proxy stops reading, and TCP pushes back on the
sender: nothing is dropped); connecting upstream has a deadline of `connect_timeout_s` (the client is
closed when it passes or the target refuses).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

READ_MAX = 64 * 1024  # largest chunk read at once (unlimited rate)
READ_MIN = 1024  # smallest chunk on a slow link
GRANULARITY_S = 0.002  # a chunk is about this much link time, so slow links deliver smoothly
DEFAULT_BURST_BYTES = 1500  # one Ethernet frame of credit: close to a real link, which has no burst
DEFAULT_MAX_BUFFER_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_RTO_MS = 200.0  # Linux's minimum TCP retransmission timeout
UPLINK, DOWNLINK = "uplink", "downlink"


def _mbps(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"LinkProxy {name}: expected a rate in Mbit/s > 0 or None (unlimited), got {value!r}")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"LinkProxy {name}: expected a number >= 0, got {value!r}")
    return float(value)


@dataclass
class ProxyStats:
    """Counters since start: bytes forwarded per direction and connections."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    accepted: int = 0
    refused: int = 0  # over max_connections, or the target could not be reached
    active: int = 0
    resets: int = 0  # connections closed by reset_all()
    delayed_by_loss: int = 0  # chunks held back by an emulated retransmission

    def as_dict(self) -> dict[str, int]:
        """Plain dict copy."""
        return asdict(self)


class _Bucket:
    """Token bucket in bytes; `reserve(n, now)` returns when n bytes have left the bottleneck."""

    def __init__(self, mbps: float | None, burst: int):
        self.burst = burst
        self.rate: float | None = None
        self.tokens = float(burst)
        self.last = 0.0
        self.set_rate(mbps)

    def set_rate(self, mbps: float | None) -> None:
        self.rate = None if mbps is None else mbps * 1e6 / 8.0

    def chunk_size(self) -> int:
        if self.rate is None:
            return READ_MAX
        return int(min(READ_MAX, max(READ_MIN, self.rate * GRANULARITY_S)))

    def reserve(self, n: int, now: float) -> float:
        if self.rate is None:
            return now
        # Tokens may go negative (debt): the next chunk then waits for the link to finish this one.
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        return now if self.tokens >= 0 else now + (-self.tokens) / self.rate


class _Direction:
    """The shape of one direction of the link."""

    def __init__(self, name: str, mbps: float | None, burst: int, delay_ms: float, jitter_ms: float):
        self.name = name
        self.bucket = _Bucket(mbps, burst)
        self.delay_s = delay_ms / 1000.0
        self.jitter_s = jitter_ms / 1000.0


class _Conn:
    """One proxied connection: the client side, the upstream side and their pump tasks."""

    def __init__(self, cid: int, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]):
        self.id = cid
        self.client = client
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.task: asyncio.Task | None = None

    def writers(self) -> list[asyncio.StreamWriter]:
        out = [self.client[1]]
        if self.upstream is not None:
            out.append(self.upstream[1])
        return out

    def abort(self, rst: bool) -> None:
        """Close both sides now; with `rst`, the peers get a TCP reset instead of a FIN."""
        for w in self.writers():
            sock = w.get_extra_info("socket")
            if rst and sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass  # already closed by the peer: nothing to reset
            w.transport.abort()


class LinkProxy:
    """Forward TCP from listen_host:port to target_host:target_port through an emulated link."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        uplink_mbps: float | None = None,
        downlink_mbps: float | None = None,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        rto_ms: float = DEFAULT_RTO_MS,
        burst_bytes: int = DEFAULT_BURST_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        connect_timeout_s: float = 5.0,
        seed: int | None = None,
    ):
        if not isinstance(target_port, int) or not 0 < target_port <= 65535:
            raise ValueError(f"LinkProxy target_port: expected 1..65535, got {target_port!r}")
        if not isinstance(listen_port, int) or not 0 <= listen_port <= 65535:
            raise ValueError(f"LinkProxy listen_port: expected 0..65535 (0: any free port), got {listen_port!r}")
        if not isinstance(loss, (int, float)) or not 0.0 <= loss < 1.0:
            raise ValueError(f"LinkProxy loss: expected a probability in [0, 1), got {loss!r}")
        for name, value, lo in (("burst_bytes", burst_bytes, 0), ("max_connections", max_connections, 1),
                                ("max_buffer_bytes", max_buffer_bytes, 1)):
            if not isinstance(value, int) or value < lo:
                raise ValueError(f"LinkProxy {name}: expected an integer >= {lo}, got {value!r}")
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        delay, jitter = _non_negative("delay_ms", delay_ms), _non_negative("jitter_ms", jitter_ms)
        self._dirs = {
            UPLINK: _Direction(UPLINK, _mbps("uplink_mbps", uplink_mbps), burst_bytes, delay, jitter),
            DOWNLINK: _Direction(DOWNLINK, _mbps("downlink_mbps", downlink_mbps), burst_bytes, delay, jitter),
        }
        self._loss = float(loss)
        self._rto_s = _non_negative("rto_ms", rto_ms) / 1000.0
        self._max_connections = max_connections
        self._queue_chunks = max(2, max_buffer_bytes // READ_MAX)
        self._connect_timeout_s = _non_negative("connect_timeout_s", connect_timeout_s)
        self._rng = random.Random(seed)
        self._stats = ProxyStats()
        self._conns: dict[int, _Conn] = {}
        self._next_id = 0
        self._blackholed = False
        self._flowing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._done: asyncio.Event | None = None
        self.port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> int:
        """Bind and start forwarding on a background thread; return the listening port."""
        if self._thread is not None:
            raise RuntimeError("LinkProxy.start() called twice")
        ready: Future[int] = Future()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="linkproxy", daemon=True)
        self._thread.start()
        try:
            self.port = ready.result(timeout)
        except FutureTimeout as exc:
            raise RuntimeError(f"LinkProxy did not start within {timeout} s") from exc
        return self.port

    @property
    def address(self) -> str:
        """host:port clients dial instead of the target."""
        return f"{self.listen[0]}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, close every connection, stop the thread."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        self._submit(self._shutdown(), timeout)
        self._thread.join(timeout)

    def __enter__(self) -> LinkProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- runtime control (thread-safe) --------------------------------------------------------

    def set_rates(self, uplink_mbps: float | None, downlink_mbps: float | None) -> None:
        """Change both directions' rates in Mbit/s (None: unlimited); applies to the next chunk."""
        up, down = _mbps("uplink_mbps", uplink_mbps), _mbps("downlink_mbps", downlink_mbps)

        def apply() -> None:
            self._dirs[UPLINK].bucket.set_rate(up)
            self._dirs[DOWNLINK].bucket.set_rate(down)

        self._apply(apply)

    def set_delay(self, delay_ms: float, jitter_ms: float | None = None) -> None:
        """Change the one-way delay (both directions; RTT = 2 x delay) and optionally the jitter."""
        delay = _non_negative("delay_ms", delay_ms) / 1000.0
        jitter = None if jitter_ms is None else _non_negative("jitter_ms", jitter_ms) / 1000.0

        def apply() -> None:
            for d in self._dirs.values():
                d.delay_s = delay
                if jitter is not None:
                    d.jitter_s = jitter

        self._apply(apply)

    def blackhole(self, on: bool = True) -> None:
        """Stop (True) or resume (False) forwarding, closing nothing: held data flows again on resume."""

        def apply() -> None:
            self._blackholed = bool(on)
            if self._flowing is not None:
                self._flowing.clear() if on else self._flowing.set()

        self._apply(apply)

    def reset_all(self, timeout: float = 10.0) -> int:
        """Close every open connection with a TCP reset; return how many were closed."""
        if self._loop is None:
            return 0
        return self._submit(self._reset_all(), timeout)

    def stats(self) -> ProxyStats:
        """A copy of the counters."""
        return ProxyStats(**self._stats.as_dict())

    @property
    def active_connections(self) -> int:
        """Connections open right now."""
        return self._stats.active

    # -- the loop thread ----------------------------------------------------------------------

    def _apply(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or not loop.is_running() or threading.current_thread() is self._thread:
            fn()
            return
        done: Future[None] = Future()

        def run() -> None:
            try:
                fn()
                done.set_result(None)
            except BaseException as exc:  # surface it to the caller's thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        done.result(10.0)

    def _submit(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _thread_main(self, ready: Future) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as exc:  # a bind failure reaches start(), not a dead thread
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.exception("link proxy thread failed")

    async def _main(self, ready: Future) -> None:
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        if not self._blackholed:
            self._flowing.set()
        self._done = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1],
                                                  limit=READ_MAX)
        ready.set_result(self._server.sockets[0].getsockname()[1])
        await self._done.wait()

    async def _shutdown(self) -> None:
        assert self._server is not None and self._done is not None
        self._server.close()
        conns = list(self._conns.values())
        for conn in conns:
            conn.abort(rst=False)
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._done.set()

    async def _reset_all(self) -> int:
        conns = list(self._conns.values())
        for conn in conns:
            conn.abort(rst=True)
        self._stats.resets += len(conns)
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        return len(conns)

    # -- one connection -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the link model does the pacing
        if len(self._conns) >= self._max_connections:
            self._stats.refused += 1
            log.warning("link proxy: refusing a connection, %d are open (max_connections)", len(self._conns))
            writer.transport.abort()
            return
        self._next_id += 1
        conn = _Conn(self._next_id, (reader, writer))
        conn.task = asyncio.current_task()
        self._conns[conn.id] = conn
        self._stats.accepted += 1
        self._stats.active += 1
        clean = False
        try:
            clean = await self._serve(conn)
        except asyncio.CancelledError:
            # reset_all() or stop() tears this connection down on purpose; ending the handler task
            # normally keeps asyncio's stream callback from reporting the cancellation as an error.
            pass
        finally:
            if clean:  # both directions ended with EOF: close politely, flushing what is buffered
                for w in conn.writers():
                    w.close()
                await asyncio.gather(*(asyncio.wait_for(w.wait_closed(), 5.0) for w in conn.writers()),
                                     return_exceptions=True)
            conn.abort(rst=False)
            self._conns.pop(conn.id, None)
            self._stats.active -= 1

    async def _serve(self, conn: _Conn) -> bool:
        """Connect upstream and pump both ways; True when both directions ended cleanly."""
        assert self._flowing is not None
        await self._flowing.wait()  # a blackholed link connects nowhere
        try:
            up = await asyncio.wait_for(asyncio.open_connection(*self.target, limit=READ_MAX),
                                        self._connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            self._stats.refused += 1
            log.info("link proxy: cannot reach %s:%d (%s); closing the client", *self.target, exc)
            return False
        conn.upstream = up
        sock = up[1].get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tasks = []
        for d, (reader, writer) in ((self._dirs[UPLINK], (conn.client[0], up[1])),
                                    (self._dirs[DOWNLINK], (up[0], conn.client[1]))):
            q: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(self._queue_chunks)
            tasks += [asyncio.ensure_future(self._read(d, reader, q)),
                      asyncio.ensure_future(self._deliver(d, q, writer))]
        try:
            # Every reader and writer ends cleanly (EOF each way), or the first failure ends the connection.
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        if failed:
            log.debug("link proxy connection %d ended: %r", conn.id, failed[0])
        return not failed and not pending

    async def _read(self, d: _Direction, reader: asyncio.StreamReader, q: asyncio.Queue) -> None:
        """Read, pace through the bucket, and queue chunks with their delivery time (bounded queue)."""
        assert self._loop is not None and self._flowing is not None
        loop, last = self._loop, 0.0
        while True:
            await self._flowing.wait()
            data = await reader.read(d.bucket.chunk_size())
            now = loop.time()
            left = d.bucket.reserve(len(data), now) if data else now
            due = left + d.delay_s
            if d.jitter_s:
                due += self._rng.uniform(-d.jitter_s, d.jitter_s)
            if data and self._loss and self._rng.random() < self._loss:
                due += self._rto_s
                self._stats.delayed_by_loss += 1
            last = max(last, due)  # never deliver out of order
            await q.put((last, data or None))  # a full queue stops the reading: TCP pushes back on the sender
            if not data:
                return
            if left > now:
                await asyncio.sleep(left - now)

    async def _deliver(self, d: _Direction, q: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        """Write each queued chunk at its delivery time; EOF becomes a half-close."""
        assert self._loop is not None and self._flowing is not None
        while True:
            due, data = await q.get()
            wait = due - self._loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()  # half-close: the other direction may still be talking
                return
            writer.write(data)
            if d.name == UPLINK:
                self._stats.uplink_bytes += len(data)
            else:
                self._stats.downlink_bytes += len(data)
            await writer.drain()


__all__ = ["LinkProxy", "ProxyStats"]
