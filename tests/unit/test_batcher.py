"""cloud_tier.batcher.DynamicBatcher on a fake tail (pure asyncio: no sockets, no onnxruntime)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cloud_tier.batcher import (
    BatcherClosedError,
    BatchRunError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
    WorkerSlots,
)
from cloud_tier.stats import ServerStats


class FakeTail:
    """Doubles its input; records the batch sizes it ran; can be held to keep runs in progress."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.gate.wait(10), "test never released the fake tail"
        x = feeds["x"]
        if (x < 0).any():
            raise RuntimeError("negative input")
        self.rows.append(x.shape[0])
        return {"y": x * 2}


def _run(coro_fn, **kw):
    async def main():
        tail = FakeTail()
        stats = ServerStats()
        with ThreadPoolExecutor(2) as pool:
            b = DynamicBatcher("m/c", tail, pool, WorkerSlots(2), stats, **kw)
            try:
                return await coro_fn(b, tail, stats)
            finally:
                tail.gate.set()
                await b.close()

    return asyncio.run(main())


async def _until(condition, timeout_s: float = 10.0) -> None:
    """Yield to the event loop until `condition()` holds; fail after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def _x(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 3), value, np.float32)}


def test_requests_arriving_together_share_one_run_and_get_their_own_rows() -> None:
    async def body(b, tail, stats):
        futs = [b.submit(_x(i, rows=1 + i % 2), 1 + i % 2) for i in range(4)]
        results = await asyncio.gather(*futs)
        for i, r in enumerate(results):
            assert np.array_equal(r.outputs["y"], np.full((1 + i % 2, 3), 2 * i, np.float32))
            assert r.batch_size == 6
        assert tail.rows == [6]
        assert stats.snapshot()["batches"] == 1

    _run(body, max_batch=16, max_wait_ms=50)


def test_max_batch_bounds_rows_per_run() -> None:
    async def body(b, tail, stats):
        await asyncio.gather(*[b.submit(_x(i), 1) for i in range(10)])
        assert sum(tail.rows) == 10 and max(tail.rows) <= 4

    _run(body, max_batch=4, max_wait_ms=50)


def test_different_trailing_shapes_run_separately() -> None:
    async def body(b, tail, stats):
        a = b.submit({"x": np.ones((1, 3), np.float32)}, 1)
        c = b.submit({"x": np.ones((1, 5), np.float32)}, 1)
        ra, rc = await asyncio.gather(a, c)
        assert ra.outputs["y"].shape == (1, 3) and rc.outputs["y"].shape == (1, 5)
        assert sorted(tail.rows) == [1, 1]

    _run(body, max_wait_ms=50)


def test_queue_bound_refuses_and_says_so() -> None:
    async def body(b, tail, stats):
        tail.gate.clear()  # hold the runs so requests pile up
        futs = []
        with pytest.raises(QueueFullError, match="queue full \\(3 requests waiting\\)"):
            for i in range(50):
                futs.append(b.submit(_x(i), 1))
                await asyncio.sleep(0)  # let the batcher take what it can
        tail.gate.set()
        results = await asyncio.gather(*futs)
        assert [float(r.outputs["y"][0, 0]) for r in results] == [2.0 * i for i in range(len(futs))]

    _run(body, max_batch=1, max_wait_ms=0, max_queue=3)


def test_a_failing_request_is_rerun_alone_and_fails_alone() -> None:
    async def body(b, tail, stats):
        good, bad = b.submit(_x(1.0), 1), b.submit(_x(-1.0), 1)
        results = await asyncio.gather(good, bad, return_exceptions=True)
        assert np.array_equal(results[0].outputs["y"], _x(2.0)["x"])
        assert isinstance(results[1], BatchRunError) and "negative input" in str(results[1])

    _run(body, max_wait_ms=50)


def test_stale_request_is_skipped() -> None:
    async def body(b, tail, stats):
        r = await asyncio.gather(b.submit(_x(1.0), 1, deadline_s=-1.0), return_exceptions=True)
        assert isinstance(r[0], DeadlineExceededError) and tail.rows == []

    _run(body)


def test_flush_ends_the_batch_window_and_idle_waits_for_answers() -> None:
    async def body(b, tail, stats):
        fut = b.submit(_x(3.0), 1)
        await asyncio.sleep(0)
        b.flush()  # a 60 s window would otherwise hold it
        await asyncio.wait_for(b.idle(), 10)
        assert fut.done() and fut.result().batch_size == 1

    _run(body, max_wait_ms=60_000)


def test_close_answers_what_is_queued() -> None:
    async def body(b, tail, stats):
        fut = b.submit(_x(3.0), 1)
        await asyncio.sleep(0)
        await b.close()
        with pytest.raises(BatcherClosedError):
            fut.result()

    _run(body, max_wait_ms=60_000)


def test_worker_slots_hand_over_first_come_first_served_and_survive_cancellation() -> None:
    async def main():
        slots = WorkerSlots(1)
        assert slots.try_take() and not slots.try_take()
        order: list[str] = []

        async def waiter(name: str) -> None:
            await slots.take()
            order.append(name)

        a = asyncio.create_task(waiter("a"))
        b = asyncio.create_task(waiter("b"))
        c = asyncio.create_task(waiter("c"))
        await asyncio.sleep(0)
        b.cancel()  # a waiter that gives up must not take a slot with it
        await asyncio.sleep(0)
        assert not slots.try_take()  # waiters queue ahead of a newcomer
        slots.give()
        await asyncio.sleep(0)
        slots.give()
        await asyncio.gather(a, c)
        assert order == ["a", "c"] and b.cancelled()
        slots.give()
        assert slots.try_take() and not slots.try_take()

    asyncio.run(main())


def test_without_a_window_a_request_goes_straight_to_a_free_worker() -> None:
    async def body(b, tail, stats):
        tail.gate.clear()
        first = b.submit(_x(1.0), 1)  # a free worker: starts at once, from submit
        assert stats.snapshot()["queued"] == 0
        second = b.submit(_x(2.0), 1)
        third = b.submit(_x(3.0), 1)  # both workers busy: this one waits in the queue
        assert stats.snapshot()["queued"] == 1
        tail.gate.set()
        results = await asyncio.gather(first, second, third)
        assert [float(r.outputs["y"][0, 0]) for r in results] == [2.0, 4.0, 6.0]

    _run(body, max_batch=1, max_wait_ms=2)


def test_requests_queued_while_the_workers_are_busy_form_the_next_batch() -> None:
    async def body(b, tail, stats):
        tail.gate.clear()
        busy = [b.submit(_x(1.0), 1), b.submit(_x(2.0), 1)]  # both workers taken, straight from submit
        waiting = [b.submit(_x(3.0), 1)]
        await _until(lambda: b._queue.empty() and len(b._collecting) == 1)  # the loop has it, waits for a worker
        waiting += [b.submit(_x(float(v)), 1) for v in range(4, 8)]  # these join it: no worker is free yet
        assert stats.snapshot()["queued"] == 5 and tail.rows == []
        tail.gate.set()
        results = await asyncio.gather(*busy, *waiting)
        assert sorted(tail.rows) == [1, 1, 5]  # the five waited together and ran as one batch
        assert [float(r.outputs["y"][0, 0]) for r in results] == [2.0 * v for v in range(1, 8)]
        assert [r.batch_size for r in results[2:]] == [5] * 5

    _run(body, max_batch=16)


def test_a_batch_waiting_for_a_worker_takes_at_most_max_batch_rows() -> None:
    async def body(b, tail, stats):
        tail.gate.clear()
        futs = [b.submit(_x(float(v)), 1) for v in range(1, 10)]  # 2 start at once, 7 queue behind
        tail.gate.set()
        await asyncio.gather(*futs)
        assert sorted(tail.rows) == [1, 1, 3, 4]  # the seven behind: a full batch of 4, then the other 3

    _run(body, max_batch=4)
