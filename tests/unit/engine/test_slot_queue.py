"""SlotQueue: N at once, FIFO past the slots, 429 past the queue, timeouts and cancels free their place."""

from __future__ import annotations

import asyncio

import pytest

from distributed.batching import SlotQueue
from distributed.errors import Overloaded, RequestTimeout

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_admits_up_to_the_slots_then_queues_in_order_then_refuses():
    changes: list[tuple[int, int]] = []
    q = SlotQueue(2, max_waiting=2, timeout_s=10, name="m", on_change=lambda b, w: changes.append((b, w)))
    gate = asyncio.Event()
    order: list[int] = []

    async def job(i: int) -> None:
        async with q.slot():
            order.append(i)
            await gate.wait()

    tasks = [asyncio.create_task(job(i)) for i in range(4)]
    await asyncio.sleep(0.05)
    assert (q.busy, q.waiting, q.depth) == (2, 2, 4)
    assert order == [0, 1]
    with pytest.raises(Overloaded) as exc:
        await q.acquire()
    assert exc.value.retry_after >= 1 and exc.value.details["slots"] == 2
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert (q.busy, q.waiting) == (0, 0)
    assert changes[-1] == (0, 0) and (2, 2) in changes


async def test_a_waiter_that_times_out_or_is_cancelled_leaves_the_queue():
    q = SlotQueue(1, max_waiting=4, timeout_s=0.1, name="m")
    await q.acquire()
    with pytest.raises(RequestTimeout, match="waited 0.1 s for a slot"):
        await q.acquire()
    assert q.waiting == 0
    q.timeout_s = 10
    t = asyncio.create_task(q.acquire())
    await asyncio.sleep(0.02)
    assert q.waiting == 1
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert q.waiting == 0 and q.busy == 1
    q.release()
    assert q.busy == 0
    async with q.slot():
        assert q.busy == 1
