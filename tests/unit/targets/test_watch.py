"""``GoneWatch``: a stream's steps awaited in the caller's task, ended by an event."""

from __future__ import annotations

import asyncio

import pytest

from distributed.targets.watch import GoneWatch, PeerGone

pytestmark = pytest.mark.anyio


def cancelling() -> int:
    """Cancellations requested of this task and not withdrawn (Python >= 3.11; 0 before)."""
    return int(getattr(asyncio.current_task(), "cancelling", lambda: 0)())


async def test_steps_pass_through_until_the_event_is_set_between_steps():
    event = asyncio.Event()
    watch = GoneWatch(event)
    try:
        assert await watch.step(asyncio.sleep(0, "one")) == "one"
        event.set()
        await asyncio.sleep(0)  # the callback runs while no step is armed: it does nothing
        assert not cancelling()
        with pytest.raises(PeerGone):
            await watch.step(asyncio.sleep(0, "two"))
    finally:
        watch.close()


async def test_the_event_set_during_a_step_ends_it_and_withdraws_the_cancellation():
    event = asyncio.Event()
    watch = GoneWatch(event)
    never = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, event.set)
    with pytest.raises(PeerGone):
        await watch.step(never)
    assert never.cancelled()
    assert not cancelling()
    await asyncio.sleep(0)  # still able to await: not cancelled
    watch.close()


async def test_a_cancellation_from_elsewhere_passes_through():
    event = asyncio.Event()
    watch = GoneWatch(event)

    async def stepper() -> None:
        await watch.step(asyncio.sleep(10))

    task = asyncio.ensure_future(stepper())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    event.set()  # later: nobody is armed
    await asyncio.sleep(0)
    watch.close()
