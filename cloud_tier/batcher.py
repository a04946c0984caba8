"""Dynamic batching per (model, cut): a free worker takes every request queued for it (up to `max_batch` rows)
and runs the tail once on their concatenation; each request gets its slice of the outputs.

This is continuous (work-conserving) batching: requests that arrive while every worker is busy wait in the
queue and form the next batch together, and a worker never idles while requests wait. With `max_wait_ms` > 0
the first request of a batch additionally waits up to that long for company before it asks for a worker,
which pays only where a bigger batch costs much less per row (a GPU); on a CPU it holds requests back while a
worker idles.

Everything here except the tail run itself happens on the server's event loop; the tail runs in a thread
pool whose size bounds how many runs (of all batchers together) are in progress.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from cloud_tier.stats import ServerStats

RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class QueueFullError(RuntimeError):
    """The batcher's queue is at its bound; the request was not taken."""


class DeadlineExceededError(RuntimeError):
    """The request's deadline passed while it waited; it was not run."""


class BatcherClosedError(RuntimeError):
    """The server stopped before the request ran."""


class BatchRunError(RuntimeError):
    """The tail failed on this request (run alone, so the failure is its own)."""


class BatchMemoryError(BatchRunError):
    """The tail (or assembling its batch) ran out of memory on this request."""


def _run_error(name: str, exc: BaseException) -> BatchRunError:
    if isinstance(exc, MemoryError):
        return BatchMemoryError(f"{name}: out of memory running the tail; retry later or run locally")
    return BatchRunError(f"{name}: tail run failed: {type(exc).__name__}: {exc}")


@dataclass
class BatchResult:
    """One request's outputs and how its batch went."""

    outputs: dict[str, np.ndarray]
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass
class _Pending:
    feeds: Mapping[str, np.ndarray]
    rows: int
    arrived: float  # time.perf_counter()
    deadline: float | None  # time.perf_counter() after which running it is pointless
    future: asyncio.Future = field(repr=False)

    @property
    def signature(self) -> tuple:
        """Requests batch together only when every input agrees beyond the batch dimension."""
        return tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(self.feeds.items()))


class WorkerSlots:
    """How many tail runs may be in progress at once (one per worker thread), shared by all batchers.

    Like asyncio.Semaphore, plus `try_take`, which takes a free slot without awaiting: the batcher's fast path.
    """

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"need at least one worker slot, got {count}")
        self._free = count
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    def try_take(self) -> bool:
        """Take a slot if one is free and nobody is waiting for one."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot, first come first served."""
        if self.try_take():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # give() hands its slot straight to this waiter
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give()  # handed over just as we were cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def give(self) -> None:
        """Return a slot: to the first waiter, else to the free pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class DynamicBatcher:
    """Batches the requests of one (model, cut) onto `run`.

    With max_batch 1 or max_wait 0 there is no window to wait in: a request that finds the queue empty and a
    worker free goes straight to the worker from `submit`, without a hop through the batching loop. Otherwise
    the loop takes the first queued request, waits out its window (if any) and then for a worker, and tops the
    batch up with everything that queued meanwhile.
    """

    def __init__(
        self,
        name: str,
        run: RunFn,
        pool: Executor,
        slots: WorkerSlots,
        stats: ServerStats,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 0.0,
        max_queue: int = 256,
    ):
        self.name = name
        self._run = run
        self._pool = pool
        self._slots = slots  # shared by all batchers: one permit per worker thread
        self._stats = stats
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._eager = max_batch == 1 or max_wait_ms <= 0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._carry: _Pending | None = None
        self._collecting: list[_Pending] = []  # taken from the queue, batch not started yet
        self._flush = asyncio.Event()  # set while draining: stop waiting for company
        self._running: set[asyncio.Task] = set()
        self._held = 0  # submitted requests without an answer yet
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher {name}")

    def submit(self, feeds: Mapping[str, np.ndarray], rows: int, deadline_s: float | None = None) -> asyncio.Future:
        """Queue one request; its future resolves to a BatchResult. QueueFullError when at the bound."""
        now = time.perf_counter()
        fut = asyncio.get_running_loop().create_future()
        item = _Pending(feeds, rows, now, None if deadline_s is None else now + deadline_s, fut)
        fast = (self._eager and self._queue.empty() and self._carry is None and not self._collecting
                and self._slots.try_take())
        if not fast:
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                raise QueueFullError(
                    f"{self.name}: queue full ({self.max_queue} requests waiting); retry later or run locally"
                ) from None
            self._stats.gauge("queued", 1)
        self._held += 1
        self._idle.clear()
        fut.add_done_callback(self._answered)
        if fast:
            self._start([item])
        return fut

    def _answered(self, _fut: asyncio.Future) -> None:
        self._held -= 1
        if self._held == 0:
            self._idle.set()

    def flush(self) -> None:
        """Run what is queued without waiting for fuller batches (used while draining)."""
        self._flush.set()

    async def idle(self) -> None:
        """Wait until every submitted request has its answer."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop the batching loop; requests still queued get BatcherClosedError."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        for item in self._take_all():
            if not item.future.done():
                item.future.set_exception(BatcherClosedError(f"{self.name}: server stopped before this request ran"))

    # -- internals ---------------------------------------------------------------------------------

    def _take_all(self) -> list[_Pending]:
        items = self._collecting + ([self._carry] if self._carry is not None else [])
        self._collecting, self._carry = [], None
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        self._stats.gauge("queued", -len(items))
        return items

    async def _next(self, timeout: float | None) -> _Pending | None:
        """The next request; with a timeout, None once it passes or when flushing leaves nothing queued."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            item = await self._queue.get()
        elif not self._queue.empty():
            item = self._queue.get_nowait()
        elif timeout <= 0 or self._flush.is_set():
            return None
        else:
            get = asyncio.ensure_future(self._queue.get())
            flush = asyncio.ensure_future(self._flush.wait())
            await asyncio.wait({get, flush}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            flush.cancel()
            get.cancel()
            if not get.done() or get.cancelled():
                return None
            item = get.result()  # it completed before the cancel: keep the item
        return item

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            assert first is not None  # without a timeout, _next waits for a request
            self._collecting = batch = [first]
            rows = first.rows
            window_end = loop.time() + self.max_wait
            while rows < self.max_batch and self.max_wait > 0:
                item = await self._next(window_end - loop.time())
                if item is None or not self._joins(batch, item, rows):
                    break
                rows += item.rows
            await self._slots.take()
            while rows < self.max_batch and self._carry is None and not self._queue.empty():
                item = self._queue.get_nowait()  # queued while this batch waited for a worker: it comes along
                if not self._joins(batch, item, rows):
                    break
                rows += item.rows
            self._collecting = []
            self._stats.gauge("queued", -len(batch))  # "queued" counts requests waiting for their run
            self._start(batch)

    def _joins(self, batch: list[_Pending], item: _Pending, rows: int) -> bool:
        """Append `item` to `batch` if it fits (same signature, rows within max_batch), else carry it over."""
        if item.signature != batch[0].signature or rows + item.rows > self.max_batch:
            self._carry = item  # starts the next batch
            return False
        batch.append(item)
        return True

    def _start(self, batch: list[_Pending]) -> None:
        """Run `batch` on a worker; the caller holds a worker slot, which the run gives back."""
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Pending]) -> None:
        try:
            now = time.perf_counter()
            live = []
            for item in batch:
                if item.future.cancelled():
                    continue
                if item.deadline is not None and now > item.deadline:
                    item.future.set_exception(DeadlineExceededError(
                        f"{self.name}: deadline passed after {1000 * (now - item.arrived):.1f} ms in the queue"))
                else:
                    live.append(item)
            if not live:
                return
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(self._pool, self._run_batch, live)
            except Exception as exc:  # noqa: BLE001 - the pool or the batch failed: every request still gets its answer
                results = [_run_error(self.name, exc)] * len(live)
            for item, result in zip(live, results):
                if item.future.cancelled():
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        finally:
            self._slots.give()

    def _run_batch(self, live: list[_Pending]) -> list[BatchResult | Exception]:
        """In a worker thread: one tail run for the batch, split back per request."""
        start = time.perf_counter()
        rows = sum(i.rows for i in live)
        try:
            if len(live) == 1:
                feeds = live[0].feeds
            else:
                feeds = {k: np.concatenate([i.feeds[k] for i in live], axis=0) for k in live[0].feeds}
            outs = self._run(feeds)
        except Exception as exc:  # onnxruntime's own error types, MemoryError; re-run alone: each its own answer
            if len(live) > 1:
                return [r for item in live for r in self._run_batch([item])]
            return [_run_error(self.name, exc)]
        compute_ms = 1000 * (time.perf_counter() - start)
        self._stats.batch(rows)
        if len(live) > 1 and any(v.ndim == 0 or v.shape[0] != rows for v in outs.values()):
            # an output without the batch dimension cannot be split: run each request alone
            return [r for item in live for r in self._run_batch([item])]
        results: list[BatchResult | Exception] = []
        offset = 0
        for item in live:
            part = {k: v[offset : offset + item.rows] for k, v in outs.items()} if len(live) > 1 else outs
            offset += item.rows
            results.append(BatchResult(part, 1000 * (start - item.arrived), compute_ms, rows))
        return results
