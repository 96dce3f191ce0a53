"""SlotQueue (engine/slots.py): N at once, FIFO past the slots, 429 past the queue, timeouts
and cancels free their place. No fixed sleeps: each step waits until the queue shows the
state it needs (``until``), which on an idle queue takes a few loop turns."""

from __future__ import annotations

import asyncio

import pytest

from distributed.engine.slots import SlotQueue
from distributed.errors import Overloaded, RequestTimeout
from tests.support import until

pytestmark = pytest.mark.anyio


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
    await until(lambda: q.waiting == 2)
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
    await until(lambda: q.waiting == 1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert q.waiting == 0 and q.busy == 1
    q.release()
    assert q.busy == 0
    async with q.slot():
        assert q.busy == 1



async def test_a_request_that_would_wait_past_the_bound_is_refused_at_once():
    # 2 slots, each held ~8 s: the first waiter expects 8*1/2 = 4 s (admitted), the second
    # 8*2/2 = 8 s (admitted), the third 8*3/2 = 12 s > 10 s → 429 now, not after 12 s
    q = SlotQueue(2, max_waiting=16, timeout_s=300, name="m", max_wait_s=10)
    q._learn(8.0)
    tickets = [await q.acquire(), await q.acquire()]
    waiters = [asyncio.create_task(q.acquire()) for _ in range(2)]
    await until(lambda: q.waiting == 2)
    assert q.expected_wait() == pytest.approx(12.0, abs=0.1)
    with pytest.raises(Overloaded) as exc:
        await q.acquire()
    assert "would wait about 12 s" in exc.value.message and "TARS_QUEUE_MAX_WAIT_S" in exc.value.message
    assert exc.value.retry_after == 12 and exc.value.http_status == 429
    assert exc.value.details["max_wait_s"] == 10 and q.waiting == 2  # refused, not queued
    for t in tickets:
        q.release(t, learn=False)  # both slots handed straight to the two admitted waiters
    await asyncio.gather(*waiters)
    assert q.busy == 2 and q.waiting == 0


async def test_before_the_first_measure_a_quarter_of_the_queue_may_wait():
    q = SlotQueue(2, max_waiting=16, timeout_s=300, name="m", max_wait_s=10)  # cap: max(2, 16 // 4) = 4
    held = [await q.acquire(), await q.acquire()]
    waiters = [asyncio.create_task(q.acquire()) for _ in range(4)]
    await until(lambda: q.waiting == 4)
    with pytest.raises(Overloaded, match="not yet measured how long a request takes: until it has, at most 4"):
        await q.acquire()
    later_choice = asyncio.create_task(q.acquire(bounded=False))  # an n > 1 request's later choice: admitted
    await until(lambda: q.waiting == 5)
    for t in held:
        q.release(t)  # measured now (~0 s): the bound is the expected wait again
    for _ in range(3):
        q.release()
    await asyncio.gather(*waiters, later_choice)
    assert q.waiting == 0


async def test_unmeasured_unbounded_or_a_later_choice_is_limited_by_the_queue_size_only():
    q = SlotQueue(2, max_waiting=3, timeout_s=300, name="m", max_wait_s=1)
    held = [await q.acquire(), await q.acquire()]
    waiters = [asyncio.create_task(q.acquire()) for _ in range(2)]  # nothing measured yet: one round
    waiters.append(asyncio.create_task(q.acquire(bounded=False)))
    await until(lambda: q.waiting == 3)
    with pytest.raises(Overloaded, match="queue size 3"):
        await q.acquire(bounded=False)
    for t in held:
        q.release(t)
    q._learn(60.0)  # now each request holds its slot a minute: a newcomer would wait ~60 s
    with pytest.raises(Overloaded, match="would wait about"):
        await q.acquire()
    later_choice = asyncio.create_task(q.acquire(bounded=False))  # n > 1: admitted with its first choice
    await until(lambda: q.waiting == 2)
    assert not later_choice.done()
    q.release()
    q.release()
    await asyncio.gather(*waiters, later_choice)
    unbounded = SlotQueue(1, max_waiting=3, timeout_s=300, name="m", max_wait_s=0)
    unbounded._learn(60.0)
    await unbounded.acquire()
    tasks = [asyncio.create_task(unbounded.acquire()) for _ in range(3)]  # ~60-180 s each: no bound, queued
    await until(lambda: unbounded.waiting == 3)
    for _ in range(3):
        unbounded.release()
    await asyncio.gather(*tasks)


async def test_slots_all_held_long_raise_the_estimate_before_any_finishes(monkeypatch):
    """Requests used to take 1 s; now every slot has been busy for 30 s and none came free:
    a newcomer must expect ~30 s per round, not the stale 1 s."""
    from distributed.engine import slots

    now = [1000.0]
    monkeypatch.setattr(slots.time, "monotonic", lambda: now[0])
    q = SlotQueue(2, max_waiting=16, timeout_s=300, name="m", max_wait_s=10)
    q._learn(1.0)
    await q.acquire()
    now[0] += 0.5
    await q.acquire()
    assert q.expected_wait() == pytest.approx(0.5)  # 1 s × 1 ahead / 2 slots
    now[0] += 30.0
    assert q.held_estimate() == pytest.approx(30.0)
    with pytest.raises(Overloaded, match="would wait about 15 s") as exc:
        await q.acquire()
    assert exc.value.retry_after == 15
